//! The standard `grpc.health.v1` service on the client port, kept in step with
//! `Service::health` (checked every second): `""`, `raftpg.v1.Read` and `raftpg.v1.Write` are
//! SERVING while the node is ready (PostgreSQL up, applying the log, a member, a leader known,
//! its copy not known to differ; a follower forwards writes), `raftpg.v1.Cluster` while it
//! lives, and `raftpg.leader` while it leads (writes are served without forwarding).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::service::Service;

/// How often the states follow the node's health.
const EVERY: Duration = Duration::from_secs(1);

fn status(r: &Result<(), String>) -> ServingStatus {
    match r {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    }
}

/// Updates `reporter` from the node's health until shutdown.
pub async fn keep_updated(
    svc: Arc<Service>,
    reporter: HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let h = svc.health();
        for name in ["", "raftpg.v1.Read", "raftpg.v1.Write"] {
            reporter.set_service_status(name, status(&h.ready)).await;
        }
        reporter
            .set_service_status("raftpg.v1.Cluster", status(&h.live))
            .await;
        reporter
            .set_service_status("raftpg.leader", status(&h.leader))
            .await;
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
    }
}
