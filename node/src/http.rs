//! The operators' HTTP frontend (`--metrics-listen`, plain HTTP: it serves no data and takes no
//! requests that change anything): Prometheus metrics at `/metrics`, and the probes a load
//! balancer or an orchestrator understands — `/health` (the node lives), `/ready` (it can serve
//! reads and forward writes), `/leader` (it leads: writes are served here). A probe answers
//! `200 OK` or `503 Service Unavailable` with the reason in the body. A thin adapter over
//! `Service::health` and `Service::observe_metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tracing::info;

use crate::metrics;
use crate::service::Service;

/// Serves the operators' endpoints on `listener` until shutdown.
pub async fn serve(
    svc: Arc<Service>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(?addr, "serving metrics and health probes over HTTP");
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/leader", get(leader))
        .with_state(svc);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "the metrics HTTP server stopped");
    }
}

async fn metrics_text(State(svc): State<Arc<Service>>) -> Response {
    svc.observe_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::encode(),
    )
        .into_response()
}

fn probe(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn health(State(svc): State<Arc<Service>>) -> Response {
    probe(svc.health().live)
}

async fn ready(State(svc): State<Arc<Service>>) -> Response {
    probe(svc.health().ready)
}

async fn leader(State(svc): State<Arc<Service>>) -> Response {
    probe(svc.health().leader)
}
