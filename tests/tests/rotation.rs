//! Replacing the cluster CA without downtime (issue 16): while writes go on, every node and
//! client first trusts both CAs (a `ca.crt` holding both), then the nodes and the clients get
//! certificates of the new CA, then the old CA is dropped — each step a rolling restart, one
//! node at a time, with a majority always up. No acknowledged write is lost, the copies stay
//! identical, and afterwards a certificate of the old CA opens nothing.

use std::time::Duration;

use raftpg_client::cert;
use testkit::{start_cluster, LoadRun};

/// A table for a write load (each load its own: the loads number their keys alike).
fn load_table(name: &str) -> String {
    format!("CREATE TABLE {name} (id serial PRIMARY KEY, k bigint NOT NULL UNIQUE, w int NOT NULL)")
}

/// Restarts every node, one at a time, waiting for each to serve again.
async fn rolling_restart(tc: &mut testkit::TestCluster) {
    for id in 1..=3 {
        tc.cluster.stop_node(id);
        tc.cluster.start_node(id).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while tc.client.status_of((id - 1) as usize).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} did not come back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ca_is_replaced_without_downtime() {
    let mut tc = start_cluster("ca_rotation", 117, 3).await.unwrap();
    for table in ["before", "after"] {
        tc.client
            .execute_one(&load_table(table), vec![])
            .await
            .unwrap();
    }
    let certs = tc.certs().unwrap().to_path_buf();
    let new = certs.join("new-ca");
    cert::init_ca(&new, "raftpg", cert::DEFAULT_CA_DAYS, false).unwrap();
    let old_ca = std::fs::read_to_string(certs.join(cert::CA_CERT)).unwrap();
    let new_ca = std::fs::read_to_string(new.join(cert::CA_CERT)).unwrap();
    // A node certificate of the old CA, for the end.
    let hosts: Vec<String> = (1..=9).map(|i| format!("127.0.117.{}", 10 + i)).collect();
    cert::issue_node(&certs, 9, &hosts, cert::DEFAULT_LEAF_DAYS, false).unwrap();

    // 1. Trust both CAs everywhere.
    std::fs::write(certs.join(cert::CA_CERT), format!("{old_ca}{new_ca}")).unwrap();
    tc.reload_client_config();
    let load = LoadRun::start(&tc, "before", 3);
    rolling_restart(&mut tc).await;
    // 2. Certificates of the new CA for the nodes and the client.
    for id in 1..=3u64 {
        cert::issue_node(&new, id, &hosts, cert::DEFAULT_LEAF_DAYS, false).unwrap();
        for file in [cert::node_cert_file(id), cert::node_key_file(id)] {
            std::fs::copy(new.join(&file), certs.join(&file)).unwrap();
        }
    }
    cert::issue_client(&new, cert::ADMIN_CLIENT, cert::DEFAULT_LEAF_DAYS, false).unwrap();
    for file in [
        cert::client_cert_file(cert::ADMIN_CLIENT),
        cert::client_key_file(cert::ADMIN_CLIENT),
    ] {
        std::fs::copy(new.join(&file), certs.join(&file)).unwrap();
    }
    rolling_restart(&mut tc).await;
    load.finish(&tc, &[1, 2, 3]).await;

    // 3. Drop the old CA.
    std::fs::write(certs.join(cert::CA_CERT), &new_ca).unwrap();
    tc.reload_client_config();
    let load = LoadRun::start(&tc, "after", 3);
    rolling_restart(&mut tc).await;
    load.finish(&tc, &[1, 2, 3]).await;

    // A client that trusts only the old CA cannot talk to the nodes, and a node certificate
    // of the old CA opens no peer port.
    let old_only = raftpg_client::ClientConfig {
        tls: Some(raftpg_client::ClientTls {
            ca_pem: old_ca.clone(),
            identity: None,
        }),
        attempts_max: 1,
        ..tc.client_config()
    };
    let e = raftpg_client::Client::with_config(&[tc.addr_of(1)], old_only)
        .unwrap()
        .execute_one("INSERT INTO after (k, w) VALUES (-1, -1)", vec![])
        .await
        .unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok, "{e}");
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&new_ca))
        .identity(tonic::transport::Identity::from_pem(
            read("node-9.crt"),
            read("node-9.key"),
        ));
    let stranger =
        tonic::transport::Endpoint::from_shared(format!("https://{}", tc.peer_addr_of(1)))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
    if let Ok(channel) = stranger {
        let e = raftpg_client::v1::peer_client::PeerClient::new(channel)
            .read_index(raftpg_client::v1::ReadIndexRequest {})
            .await
            .unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok, "{e}");
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
}
