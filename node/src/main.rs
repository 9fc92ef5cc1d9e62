//! raftpg-node: one member of a raftpg cluster. See `node` for how the parts fit together and
//! `../shared/design.md` for the data flow and invariants.

mod api;
mod applier;
mod checksums;
mod clock;
mod command;
mod config;
mod determinism;
mod log_store;
mod network;
mod node;
mod postgres;
mod read_pool;
mod request_log;
mod snapshot;
mod state_machine;
mod values;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cfg = config::NodeConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_target(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(node::run(cfg))
}
