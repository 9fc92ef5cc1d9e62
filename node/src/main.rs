//! raftpg-node: one member of a raftpg cluster. The library (`lib.rs`) says how the parts fit
//! together; `../shared/design.md` has the data flow and invariants.

use clap::Parser;
use raftpg_node::{config, server};

/// mimalloc: most of a node's allocations are short-lived request and message buffers, which
/// it serves with less CPU than glibc's malloc (measured in docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    runtime.block_on(server::run(cfg))
}
