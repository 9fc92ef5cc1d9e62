//! Progress of a long cluster operation (a learner catching up, a node rebuilding) while it
//! runs: a progress bar on a terminal (indicatif), a plain line every few seconds otherwise.
//!
//! [`follow`] runs the operation and, meanwhile, polls the status of the node it concerns
//! through the cluster: how far its PostgreSQL applied the log against the commit index, and
//! the snapshot it is receiving or restoring (bytes, rate, time left), as the node reports it.

use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::Client;

/// How often the node's status is polled.
const POLL: Duration = Duration::from_millis(500);

/// How often a plain line is printed when stderr is not a terminal (only when it changed).
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Runs `work` while showing how far node `node_id` is (see the module doc). The bar goes to
/// stderr and is cleared when `work` ends.
pub async fn follow<T>(client: &Client, node_id: u64, work: impl Future<Output = T>) -> T {
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} node {prefix} [{bar:30}] {pos}/{len} entries applied {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(node_id.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(POLL);
    let (mut last_line, mut last_text) = (Instant::now(), String::new());
    loop {
        tokio::select! {
            out = &mut work => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                return out;
            }
            _ = tick.tick() => {
                let Some((applied, target, snapshot)) = poll(client, node_id).await else {
                    continue;
                };
                match &bar {
                    Some(bar) => {
                        bar.set_length(target.max(applied));
                        bar.set_position(applied);
                        bar.set_message(snapshot);
                    }
                    None => {
                        let text = format!(
                            "node {node_id}: applied {applied} of {target} entries{}",
                            if snapshot.is_empty() { String::new() } else { format!("; {snapshot}") }
                        );
                        if text != last_text && last_line.elapsed() >= PLAIN_EVERY {
                            eprintln!("{text}");
                            (last_line, last_text) = (Instant::now(), text);
                        }
                    }
                }
            }
        }
    }
}

/// Node `node_id`'s applied index, the commit index of the member that answered, and the
/// snapshot the node reports receiving or restoring (empty when none).
async fn poll(client: &Client, node_id: u64) -> Option<(u64, u64, String)> {
    for via in 0..client.addrs().len() {
        let Ok(member) = client.status_of(via).await else {
            continue;
        };
        let node = client.member_status(via, node_id).await.ok()?;
        return Some((
            node.applied_index,
            member.committed_index,
            node.snapshot_progress,
        ));
    }
    None
}

/// Waits until node `node_id`'s PostgreSQL has applied the log up to the commit index of when
/// this was called (a node catching up after a restart, a learner), at most `timeout`; shows
/// progress meanwhile ([`follow`]). Returns the index it reached.
pub async fn wait_caught_up(
    client: &Client,
    node_id: u64,
    timeout: Duration,
) -> Result<u64, crate::ClientError> {
    let unavailable = |m: String| crate::ClientError::Status(tonic::Status::unavailable(m));
    let Some((_, target, _)) = poll(client, node_id).await else {
        return Err(unavailable(format!(
            "neither node {node_id} nor any member answered"
        )));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let wait = async {
        loop {
            let seen = poll(client, node_id).await;
            if let Some((applied, _, _)) = seen {
                if applied >= target {
                    return Ok(applied);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::ClientError::Status(
                    tonic::Status::deadline_exceeded(format!(
                        "node {node_id} had applied {} of {target} entries after {timeout:?}",
                        seen.map(|s| s.0.to_string()).unwrap_or_else(|| "?".into())
                    )),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    };
    follow(client, node_id, wait).await
}
