//! Backups and restores (issue 19), end to end on real clusters: write, back up (from a
//! follower), write more, destroy the cluster, start a new one from the backup, and every row
//! up to the backup's index is there on every node, identical, and nothing after it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use raftpg_client::v1::Consistency;
use testkit::{start_cluster, start_cluster_restored};

/// A scratch directory outside every test cluster's (which are deleted with them).
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("RAFTPG_TEST_DIR").unwrap_or_else(|_| "/tmp/raftpg-tests".into()),
    )
    .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restores_into_a_new_cluster_with_every_row_up_to_its_index() {
    let keep = scratch("backup-files");
    let tc = start_cluster("backup", 129, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one(
        "CREATE TABLE players (id serial PRIMARY KEY, name text NOT NULL, joined timestamptz DEFAULT now())",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one(
        "INSERT INTO players (name) SELECT 'p' || g FROM generate_series(1, 500) g ORDER BY g",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one("CREATE ROLE matchmaker LOGIN PASSWORD 'mm-secret'", vec![])
        .await
        .unwrap();
    c.execute_one("GRANT SELECT, INSERT ON players TO matchmaker", vec![])
        .await
        .unwrap();
    let last_ack = c
        .execute_one(
            "INSERT INTO players (name) VALUES ('last before the backup')",
            vec![],
        )
        .await
        .unwrap();
    let last_ack_index = last_ack.log_index;
    let before = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();

    // One backup, from a follower by default.
    let file = keep.join("one.backup");
    let h = c
        .backup(&file, None, Duration::from_secs(60))
        .await
        .unwrap();
    assert_ne!(h.node_id, leader, "the backup came from the leader: {h:?}");
    assert!(
        h.log_index >= last_ack_index,
        "the backup at {} misses the write acknowledged at {last_ack_index}",
        h.log_index
    );
    assert_eq!(raftpg_client::backup::verify(&file).unwrap(), h);
    // From the member asked for; every backup is complete on its own.
    let from_leader = keep.join("leader.backup");
    let hl = c
        .backup(&from_leader, Some(leader), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(hl.node_id, leader);

    // Backups on a schedule keep the newest --keep.
    let scheduled = keep.join("scheduled");
    raftpg_client::backup::run_schedule(
        c,
        &scheduled,
        Duration::from_millis(300),
        2,
        None,
        Duration::from_secs(60),
        Some(3),
    )
    .await
    .unwrap();
    let files = raftpg_client::backup::scheduled_backups(&scheduled).unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        raftpg_client::backup::verify(f).unwrap();
    }

    // A damaged copy is refused, whole and by a node asked to start from it.
    let damaged = keep.join("damaged.backup");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&damaged, &bytes).unwrap();
    let e = raftpg_client::backup::verify(&damaged).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");

    // Writes after the backup.
    c.execute_one(
        "INSERT INTO players (name) SELECT 'late' || g FROM generate_series(1, 50) g ORDER BY g",
        vec![],
    )
    .await
    .unwrap();
    c.execute_one("CREATE TABLE after_backup (id int)", vec![])
        .await
        .unwrap();

    // Destroy the cluster (its certificates and admin password kept: the backup's roles keep
    // their passwords).
    let certs = keep.join("certs");
    copy_dir(tc.certs().unwrap(), &certs);
    drop(tc);

    let node_bin = raftpg_client::local_cluster::default_node_bin();
    let out = std::process::Command::new(&node_bin)
        .args(["--id", "1", "--insecure", "--data-dir"])
        .arg(keep.join("damaged-node"))
        .args(["--listen", "127.0.129.40:17129", "--restore-from"])
        .arg(&damaged)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");

    // A new cluster from the backup: every node seeded from the same file.
    let mut tc = start_cluster_restored("backup", 129, 3, &file, &certs)
        .await
        .unwrap();
    let c = &tc.client;
    let after = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    assert_eq!(after, before, "the restored copy is not the backed-up one");
    for id in 1..=3 {
        let r = tc
            .node_client(id)
            .query_sql(
                "SELECT count(*), count(*) FILTER (WHERE name LIKE 'late%') FROM players",
                vec![],
                Consistency::Linearizable,
            )
            .await
            .unwrap();
        assert_eq!(
            format!(
                "{:?}",
                r.rows[0].values.iter().map(|v| &v.kind).collect::<Vec<_>>()
            ),
            "[Some(Int64(501)), Some(Int64(0))]",
            "node {id}"
        );
    }
    // The new cluster goes on from the backup's position: later terms, later indexes, the
    // sequence after the backed-up rows, the backed-up role with its password.
    let w = c
        .execute_one(
            "INSERT INTO players (name) VALUES ('first after the restore') RETURNING id",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        w.log_index > h.log_index,
        "{} <= {}",
        w.log_index,
        h.log_index
    );
    assert_eq!(
        format!("{:?}", w.results[0].rows[0].values[0].kind),
        "Some(Int64(502))"
    );
    let st = c.status_of(0).await.unwrap();
    assert!(st.term > h.log_term, "term {} <= {}", st.term, h.log_term);
    assert_eq!(st.members.len(), 3);
    let mm = tc
        .wire_as(1, "matchmaker", Some("mm-secret"))
        .await
        .unwrap();
    let n: i64 = mm
        .query_one("SELECT count(*) FROM players", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 502);
    // A restarted node does not seed itself again (same flag, same file).
    tc.cluster.stop_node(2);
    tc.cluster.start_node(2).unwrap();
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let _ = std::fs::remove_dir_all(&keep);
}
