//! The *register* workload: per-key read / write / compare-and-set on rows of
//! `registers (k, v)`. Writes and CAS go through the write API (to any node; followers
//! forward); reads are `LINEARIZABLE` reads sent to a random node, so followers answer through
//! the leader's read index. All processes work on the current key; the key moves on every
//! [`OPS_PER_KEY`] operations so that each key's history stays small enough to check.
//! Checked per key for linearizability by [`crate::linearizable`].
//!
//! History values (Jepsen's independent-key form): write `[k, v]`, cas `[k, [from, to]]`,
//! read `[k, null]` at invoke and `[k, v-or-null]` when ok.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use raftpg_client::v1::Consistency;
use raftpg_client::values;
use serde_json::json;

use crate::common::{complete_write, read_request, Env, Lcg, Outcome, Process};

/// Tables of this workload.
pub const SCHEMA: &[&str] = &["CREATE TABLE registers (k int PRIMARY KEY, v bigint NOT NULL)"];

/// Operations on one key before all processes move to the next.
pub const OPS_PER_KEY: u64 = 200;

/// One client process.
pub async fn client(env: Env, slot: u64, ops: Arc<AtomicU64>) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let mut rng = Lcg::new(env.seed.wrapping_add(slot * 7919));
    let nodes = env.addrs.len() as u64;
    while !env.stopped() {
        let _op = env.op().await;
        let k = (ops.fetch_add(1, Ordering::Relaxed) / OPS_PER_KEY) as i64;
        match rng.next(4) {
            0 | 1 => {
                env.history.push("invoke", p.id, "read", json!([k, null]));
                // `client` lists nodes rotated by slot; position `node` is some node.
                let node = rng.next(nodes) as usize;
                let r = client
                    .query_node(
                        node,
                        read_request(
                            "SELECT v FROM registers WHERE k = $1",
                            vec![values::int(k)],
                            Consistency::Linearizable,
                        ),
                    )
                    .await;
                match r {
                    Ok(r) => {
                        let v = r
                            .rows
                            .first()
                            .and_then(|row| row.values.first())
                            .and_then(values::as_i64);
                        env.history.push("ok", p.id, "read", json!([k, v]));
                    }
                    // A read has no effect: any error is a definite failure.
                    Err(e) => env.history.push_error(
                        "fail",
                        p.id,
                        "read",
                        json!([k, null]),
                        Some(e.to_string()),
                    ),
                }
            }
            2 => {
                let v = rng.next(5) as i64;
                let value = json!([k, v]);
                env.history.push("invoke", p.id, "write", value.clone());
                let r = client
                    .execute_one(
                        "INSERT INTO registers (k, v) VALUES ($1, $2) \
                         ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                        vec![values::int(k), values::int(v)],
                    )
                    .await;
                if complete_write(&env, &mut p, "write", value.clone(), r, |_| value) {
                    client = env.client(slot);
                }
            }
            _ => {
                let (from, to) = (rng.next(5) as i64, rng.next(5) as i64);
                let value = json!([k, [from, to]]);
                env.history.push("invoke", p.id, "cas", value.clone());
                let r = client
                    .execute_one(
                        "UPDATE registers SET v = $3 WHERE k = $1 AND v = $2",
                        vec![values::int(k), values::int(from), values::int(to)],
                    )
                    .await;
                let retired = match r {
                    // The row did not hold `from`: the CAS definitely did not happen.
                    Ok(r) if r.results.first().map(|s| s.rows_affected) != Some(1) => {
                        env.history.push("fail", p.id, "cas", value);
                        false
                    }
                    r => complete_write(&env, &mut p, "cas", value.clone(), r, |_| value),
                };
                if retired {
                    client = env.client(slot);
                }
            }
        }
    }
}

/// Checks the history.
pub fn check_run(env: &Env) -> Outcome {
    let ops = env.history.ops();
    let lines = crate::linearizable::check(&ops);
    Outcome::of(&ops, lines)
}
