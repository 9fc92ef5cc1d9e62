//! The trust boundary between nodes (issue 16). Peer RPCs (Raft's AppendEntries/Vote/
//! InstallSnapshot, StartElection, ReadIndex, Retire, TableChecksums, PublishAddress) are
//! served only on the peer port, and with `--tls-dir` only to a node certificate of the
//! cluster CA that names a current member and the node the message claims to come from; the
//! peer port refuses callers without a certificate at the TLS handshake, and clients' requests
//! with a client certificate. The attack from the issue — a hand-made
//! AppendEntries at term 1000 from an invented leader, carrying `DELETE FROM players` — is
//! refused whatever certificate the stranger holds, and no node changes: no term, no entry, no
//! row. A removed node's certificate is refused from then on.

use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::vote::RaftLeaderId;
use openraft::EntryPayload;
use raftpg_client::v1::peer_client::PeerClient as RaftClient;
use raftpg_client::v1::write_client::WriteClient;
use raftpg_client::v1::{Consistency, RaftMessage};
use raftpg_node::command::{Command, SqlStatement, TypeConfig, WriteCommand};
use raftpg_node::command::{CommittedLeaderId, Entry, LogId, Vote};
use testkit::start_cluster;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// A certificate file and its key file, in the certificates' directory.
type KeyPair<'a> = (&'a str, &'a str);

/// A channel to `addr` over TLS that trusts the cluster CA in `certs` and presents `identity`
/// (certificate and key file names in `certs`), or nothing.
async fn tls_channel(
    certs: &std::path::Path,
    addr: &str,
    identity: Option<KeyPair<'_>>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("a certificate file");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.crt")));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("an address")
        .tls_config(tls)
        .expect("TLS settings")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// A Peer client of the node at `addr` (see [`tls_channel`]).
async fn raft_client(
    certs: &std::path::Path,
    addr: &str,
    identity: Option<KeyPair<'_>>,
) -> RaftClient<tonic::transport::Channel> {
    RaftClient::new(
        tls_channel(certs, addr, identity)
            .await
            .expect("a TLS connection"),
    )
}

/// The attack: AppendEntries at term 1000 from "node 99", with one entry deleting every row.
fn attack() -> RaftMessage {
    append_entries_from(99)
}

/// AppendEntries at term 1000 from `node`, with one entry (`DELETE FROM players`) at index 1
/// after no previous entry: malformed (a correct leader would send index 0).
fn append_entries_from(node: u64) -> RaftMessage {
    let leader = CommittedLeaderId::new(1000, node);
    let entry = Entry {
        log_id: LogId::new(leader, 1),
        payload: EntryPayload::Normal(Command::Sql(WriteCommand {
            statements: vec![SqlStatement {
                sql: "DELETE FROM players".into(),
                params: vec![],
            }],
            leader_ts_micros: 1,
            seed: 1,
            request_id: None,
            user: None,
        })),
    };
    let rpc = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1000, node),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: Some(LogId::new(leader, 1)),
    };
    RaftMessage {
        payload: serde_json::to_vec(&rpc).expect("json"),
        data: Vec::new(),
    }
}

/// A vote request from candidate `id` at term 1000.
fn vote_from(id: u64) -> RaftMessage {
    let rpc = VoteRequest::<TypeConfig> {
        vote: Vote::new(1000, id),
        last_log_id: None,
        leadership_transfer: false,
    };
    RaftMessage {
        payload: serde_json::to_vec(&rpc).expect("json"),
        data: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_member_nodes_speak_for_themselves() {
    let tc = start_cluster("peer_tls", 112, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE players (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    c.execute_one("INSERT INTO players SELECT generate_series(1, 9)", vec![])
        .await
        .unwrap();
    // A write through a follower travels to the leader over the nodes' mutual TLS.
    let (_, follower) = tc.leader_and_follower().await;
    tc.node_client(follower)
        .execute_one("INSERT INTO players VALUES (10)", vec![])
        .await
        .unwrap();
    let terms = |statuses: Vec<Result<raftpg_client::v1::StatusResponse, _>>| -> Vec<u64> {
        statuses.into_iter().map(|s| s.unwrap().term).collect()
    };
    let terms_before = terms(c.status_all().await);

    let certs = tc.certs().unwrap().to_path_buf();
    raftpg_client::cert::issue_node(&certs, 9, &["127.0.112.19".to_string()], 825, false).unwrap();
    // Without a certificate the peer port's TLS handshake fails: no RPC is reached.
    for id in 1..=3 {
        if let Ok(channel) = tls_channel(&certs, &tc.peer_addr_of(id), None).await {
            let e = RaftClient::new(channel)
                .append_entries(attack())
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                ),
                "no certificate to node {id}: {e}"
            );
        }
    }
    let strangers: [(&str, Option<KeyPair>, Code); 3] = [
        (
            "a client certificate",
            Some(("client-admin.crt", "client-admin.key")),
            Code::Unauthenticated,
        ),
        (
            "node 2's certificate claiming node 99",
            Some(("node-2.crt", "node-2.key")),
            Code::PermissionDenied,
        ),
        (
            "the certificate of node 9, not a member",
            Some(("node-9.crt", "node-9.key")),
            Code::PermissionDenied,
        ),
    ];
    for (who, identity, code) in strangers {
        for id in 1..=3 {
            let mut raft = raft_client(&certs, &tc.peer_addr_of(id), identity).await;
            let e = raft.append_entries(attack()).await.unwrap_err();
            assert_eq!(e.code(), code, "{who} to node {id}: {e}");
            let e = raft.vote(vote_from(99)).await.unwrap_err();
            assert_eq!(e.code(), code, "{who}, a vote, to node {id}: {e}");
        }
    }
    // A member's malformed message is refused before it reaches Raft (openraft 0.9 would stop
    // on it).
    let mut raft = raft_client(
        &certs,
        &tc.peer_addr_of(1),
        Some(("node-2.crt", "node-2.key")),
    )
    .await;
    let e = raft
        .append_entries(append_entries_from(2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // A member cannot vote in another's name.
    let mut raft = raft_client(
        &certs,
        &tc.peer_addr_of(1),
        Some(("node-2.crt", "node-2.key")),
    )
    .await;
    let e = raft.vote(vote_from(3)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // Plaintext does not even reach the RPCs.
    let plain = Endpoint::from_shared(format!("http://{}", tc.peer_addr_of(1)))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let e = RaftClient::new(channel)
            .append_entries(attack())
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok, "{e}");
    }

    // Nothing changed: same terms, every row on every node.
    assert_eq!(terms(c.status_all().await), terms_before);
    for id in 1..=3 {
        let r = tc
            .node_client(id)
            .query_sql(
                "SELECT count(*) FROM players",
                vec![],
                Consistency::Linearizable,
            )
            .await
            .unwrap();
        assert_eq!(
            format!("{:?}", r.rows[0].values[0].kind),
            "Some(Int64(10))",
            "node {id}"
        );
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();

    // A removed node's certificate is refused from then on: on every remaining node once that
    // node has applied the removal (a follower learns the commit with the next heartbeat).
    c.remove(&[3]).await.unwrap();
    for id in 1..=2 {
        let mut raft = raft_client(
            &certs,
            &tc.peer_addr_of(id),
            Some(("node-3.crt", "node-3.key")),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match raft.vote(vote_from(3)).await {
                Err(e) if e.code() == Code::PermissionDenied => break,
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => panic!("node 3's vote to node {id} after its removal: {other:?}"),
            }
        }
    }
    c.execute_one("INSERT INTO players VALUES (11)", vec![])
        .await
        .unwrap();
}

/// Secure by default: a node given neither `--tls-dir` nor `--insecure` refuses to start, and
/// says how to make the certificates.
#[test]
fn a_node_without_certificates_refuses_to_start() {
    let dir = std::env::temp_dir().join("raftpg-no-certs");
    let _ = std::fs::remove_dir_all(&dir);
    let out = std::process::Command::new(raftpg_client::local_cluster::default_node_bin())
        .args(["--id", "1", "--data-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.112.30:17112"])
        .env_remove("RAFTPG_TLS_DIR")
        .env_remove("RAFTPG_INSECURE")
        .output()
        .expect("the node binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no --tls-dir"), "{stderr}");
    assert!(stderr.contains("raftpg cert cluster"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The two ports: each node reports its client and peer addresses and the membership holds
/// both; the client port serves no peer RPC; the peer port serves no client (a client
/// certificate is refused there); a client cannot pass its request off as forwarded by a
/// node (the client port drops the mark).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_client_port_and_the_peer_port_are_apart() {
    let tc = start_cluster("ports", 113, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE t (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    for st in c.status_all().await {
        let st = st.unwrap();
        let id = st.node_id;
        assert_eq!(st.client_addr, tc.addr_of(id));
        assert_eq!(st.peer_addr, tc.peer_addr_of(id));
        for m in &st.members {
            assert_eq!(m.addr, tc.addr_of(m.node_id), "node {id}'s view");
            assert_eq!(m.peer_addr, tc.peer_addr_of(m.node_id), "node {id}'s view");
        }
    }
    let certs = tc.certs().unwrap().to_path_buf();
    let node2 = Some(("node-2.crt", "node-2.key"));
    let admin = Some(("client-admin.crt", "client-admin.key"));
    for id in 1..=3 {
        // No peer RPC on the client port, even with a member's certificate.
        let mut raft = raft_client(&certs, &tc.addr_of(id), node2).await;
        let e = raft.vote(vote_from(2)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "node {id}: {e}");
        // No client on the peer port.
        let channel = tls_channel(&certs, &tc.peer_addr_of(id), admin)
            .await
            .unwrap();
        let e = WriteClient::new(channel)
            .execute(insert(100 + id as i32))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "node {id}: {e}");
    }
    // A follower given a request marked as forwarded on its client port forwards it to the
    // leader as any client request (were the mark believed, it would refuse: "not the
    // leader").
    let (_, follower) = tc.leader_and_follower().await;
    let channel = tls_channel(&certs, &tc.addr_of(follower), admin)
        .await
        .unwrap();
    let credentials = tc.client_config().credentials.unwrap();
    let mut req = tonic::Request::new(insert(1));
    let meta = req.metadata_mut();
    meta.insert(raftpg_proto::FORWARDED_METADATA, "2".parse().unwrap());
    meta.insert(
        raftpg_proto::USER_METADATA,
        credentials.user.parse().unwrap(),
    );
    meta.insert(
        raftpg_proto::PASSWORD_METADATA,
        credentials.password.parse().unwrap(),
    );
    WriteClient::new(channel.clone())
        .execute(req)
        .await
        .unwrap();
    // Nor can a client claim a role a node authenticated (that is for the peer port): without
    // credentials the request is refused.
    // In either of its forms (text, and binary for names beyond ASCII).
    for binary in [false, true] {
        let mut req = tonic::Request::new(insert(2));
        let meta = req.metadata_mut();
        if binary {
            meta.insert_bin(
                raftpg_proto::metadata::PRINCIPAL.bin,
                tonic::metadata::BinaryMetadataValue::from_bytes(b"admin"),
            );
        } else {
            meta.insert(raftpg_proto::PRINCIPAL_METADATA, "admin".parse().unwrap());
        }
        meta.insert(raftpg_proto::PRINCIPAL_ADMIN_METADATA, "1".parse().unwrap());
        let e = WriteClient::new(channel.clone())
            .execute(req)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "binary {binary}: {e}");
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let n: Vec<i64> = tc.column(1, "SELECT count(*) FROM t").await.unwrap();
    assert_eq!(n, vec![1]);
}

/// `INSERT INTO t VALUES (id)` as a raw Write request.
fn insert(id: i32) -> raftpg_client::v1::ExecuteRequest {
    raftpg_client::v1::ExecuteRequest {
        statements: vec![raftpg_client::v1::Statement {
            sql: format!("INSERT INTO t VALUES ({id})"),
            params: vec![],
        }],
        request_id: None,
    }
}
