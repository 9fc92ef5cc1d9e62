//! Operating raftpg (issue 19): every node serves Prometheus metrics and health probes on its
//! operators' HTTP port (`--metrics-listen`, client port + 3000), and the key series move
//! when writes and reads happen.

use std::time::Duration;

use raftpg_client::local_cluster::metrics_addr_of;
use raftpg_client::v1::{Consistency, QueryRequest};
use testkit::{http_get, metric, start_cluster, values};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_serves_metrics_and_probes_that_follow_the_cluster() {
    let tc = start_cluster("operations", 128, 3).await.unwrap();
    let c = &tc.client;
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    c.execute_one("CREATE TABLE ops (id int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    let http = |id: u64| metrics_addr_of(&tc.addr_of(id));
    let scrape = |id: u64| {
        let addr = http(id);
        async move {
            let (status, body) = http_get(&addr, "/metrics").await.unwrap();
            assert_eq!(status, 200, "{body}");
            body
        }
    };

    // Probes: every node lives and is ready; exactly the leader answers /leader with 200.
    for id in 1..=3 {
        let (live, why) = http_get(&http(id), "/health").await.unwrap();
        assert_eq!(live, 200, "node {id}: {why}");
        let (ready, why) = http_get(&http(id), "/ready").await.unwrap();
        assert_eq!(ready, 200, "node {id}: {why}");
        let (leads, why) = http_get(&http(id), "/leader").await.unwrap();
        assert_eq!(leads == 200, id == leader, "node {id}: {leads} {why}");
    }

    // The standard gRPC health service says the same; reflection lists the API.
    for id in 1..=3 {
        let mut health = tonic_health::pb::health_client::HealthClient::new(tc.channel(id));
        for (service, serving) in [
            ("", true),
            ("raftpg.v1.Write", true),
            ("raftpg.leader", id == leader),
        ] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let r = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let is_serving = r.status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                if is_serving == serving {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {id} {service:?}: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let services = reflected_services(tc.channel(1)).await;
    for s in [
        "raftpg.v1.Write",
        "raftpg.v1.Read",
        "raftpg.v1.Cluster",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }

    // The series move with writes and reads.
    let before: Vec<String> = futures_join(&scrape).await;
    let writes_before = metric(
        &before[(leader - 1) as usize],
        "raftpg_writes_total{outcome=\"ok\"}",
    )
    .unwrap_or(0.0);
    let mut last = 0;
    for i in 0..20 {
        last = c
            .execute_one("INSERT INTO ops VALUES ($1)", vec![values::int(i)])
            .await
            .unwrap()
            .log_index;
    }
    let e = c
        .execute_one("INSERT INTO ops VALUES (1)", vec![])
        .await
        .expect_err("a duplicate key");
    assert_eq!(e.sqlstate().as_deref(), Some("23505"));
    // A request over a limit (--request-bytes-max, 4 MiB) is refused and counted.
    let huge = format!("INSERT INTO ops VALUES (1) -- {}", "x".repeat(5 << 20));
    let e = c
        .execute_one(&huge, vec![])
        .await
        .expect_err("over the request size limit");
    assert_eq!(e.sqlstate().as_deref(), Some("54000"), "{e}");
    // Three reads per node: the first prepares its statement, the next run it directly (one
    // statement, no transaction: the connection knows PostgreSQL holds the index).
    for id in 1..=3u64 {
        for _ in 0..3 {
            let r = c
                .query_node(
                    (id - 1) as usize,
                    QueryRequest {
                        sql: "SELECT count(*) FROM ops".into(),
                        consistency: Consistency::AtLeast as i32,
                        min_index: last,
                        timeout_ms: 5_000,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert!(r.applied_index >= last, "{r:?}");
            assert_eq!(r.rows.len(), 1);
        }
    }
    let after: Vec<String> = futures_join(&scrape).await;
    let l = &after[(leader - 1) as usize];
    let writes_after = metric(l, "raftpg_writes_total{outcome=\"ok\"}").unwrap_or(0.0);
    assert!(
        writes_after >= writes_before + 20.0,
        "{writes_before} → {writes_after}\n{l}"
    );
    assert!(
        metric(l, "raftpg_errors_total{class=\"23\"}").unwrap_or(0.0) >= 1.0,
        "{l}"
    );
    let refused: f64 = after
        .iter()
        .filter_map(|t| metric(t, "raftpg_refused_total{sqlstate=\"54000\"}"))
        .sum();
    assert!(refused >= 1.0, "{l}");
    assert_eq!(metric(l, "raftpg_role{role=\"leader\"}"), Some(1.0), "{l}");
    assert!(
        metric(l, "raftpg_write_seconds_count").unwrap_or(0.0) >= 21.0,
        "{l}"
    );
    // Entries proposed by the leader, with their writes and sizes.
    let proposed = |t: &str| metric(t, "raftpg_proposal_writes_sum").unwrap_or(0.0);
    assert!(
        proposed(l) >= proposed(&before[(leader - 1) as usize]) + 21.0,
        "{l}"
    );
    assert!(
        metric(l, "raftpg_proposal_bytes_sum").unwrap_or(0.0) > 0.0,
        "{l}"
    );
    for (i, text) in after.iter().enumerate() {
        let id = i as u64 + 1;
        // Every node applied batches, and its log and snapshot stores use disk.
        let batches = |t: &str| metric(t, "raftpg_apply_batch_entries_sum").unwrap_or(0.0);
        assert!(
            batches(text) >= batches(&before[i]) + 21.0,
            "node {id}\n{text}"
        );
        assert!(
            metric(text, "raftpg_apply_batch_seconds_count").unwrap_or(0.0) >= 1.0,
            "node {id}"
        );
        assert!(
            metric(text, "raftpg_disk_bytes{store=\"log\"}").unwrap_or(0.0) > 0.0,
            "node {id}\n{text}"
        );
        assert_eq!(
            metric(text, "raftpg_postgres_restarts_total"),
            Some(0.0),
            "node {id}"
        );
        let applied = metric(text, "raftpg_log_index{position=\"applied\"}").unwrap_or(0.0);
        assert!(
            applied >= last as f64,
            "node {id} applied {applied} < {last}\n{text}"
        );
        assert_eq!(metric(text, "raftpg_postgres_up"), Some(1.0), "node {id}");
        assert!(
            metric(text, "raftpg_term").unwrap_or(0.0) >= 1.0,
            "node {id}"
        );
        assert!(
            metric(
                text,
                "raftpg_reads_total{consistency=\"at_least\",outcome=\"ok\"}"
            )
            .unwrap_or(0.0)
                >= 1.0,
            "node {id}\n{text}"
        );
        for path in ["prepared", "direct"] {
            let n = |t: &str| {
                metric(t, &format!("raftpg_read_paths_total{{path=\"{path}\"}}")).unwrap_or(0.0)
            };
            assert!(n(text) > n(&before[i]), "node {id}: no {path} read\n{text}");
        }
        if id == 3 {
            assert_dashboard_series_exist(&after);
        }
        if id != leader {
            // The leader reports every follower's replication lag.
            let lag = metric(l, &format!("raftpg_peer_lag_entries{{peer=\"{id}\"}}"));
            assert!(lag.is_some(), "no lag of node {id} on the leader\n{l}");
        }
    }
}

/// Every series the Grafana dashboard (`docs/grafana-dashboard.json`) queries is one the nodes
/// export (`scrapes`: every node's /metrics), so renaming a metric cannot silently empty a panel.
fn assert_dashboard_series_exist(scrapes: &[String]) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let families: std::collections::BTreeSet<String> = scrapes
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("raftpg_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|f| families.contains(*f))
                    .unwrap_or(&name);
                assert!(
                    families.contains(family),
                    "panel {:?} queries {name}, which no node exports",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "the dashboard queries only {queried} series");
}

/// Scrapes nodes 1–3 in turn.
async fn futures_join<F, Fut>(scrape: &F) -> Vec<String>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut out = Vec::new();
    for id in 1..=3 {
        out.push(scrape(id).await);
    }
    out
}

/// The services the node at `channel` lists through gRPC server reflection.
async fn reflected_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}
