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
mod proposer;
mod read_index;
mod read_pool;
mod request_log;
mod session_rules;
mod snapshot;
mod state_machine;
mod time_literals;
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
    let mut builder = match cfg.worker_threads {
        // One thread: no cross-thread wake-ups (best when several nodes share a small host).
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(node::run(cfg))
}
