//! The *list-append* workload (Elle's): transactions of 1–4 micro-operations, each an append
//! of a unique integer to a key's list or a read of a key's whole list. Transactions with an
//! append are one multi-statement write request (one log entry, atomic); read-only
//! transactions are one `SELECT` through the read API at `LINEARIZABLE` on a random node.
//! Keys come from a small window that slides as the run goes on, so lists stay short.
//! Checked for strict serializability by [`crate::elle`].
//!
//! History values: `[["append", k, v], ["r", k, null]]` at invoke; reads filled with the list
//! when ok.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use raftpg_client::v1::{Consistency, Statement};
use raftpg_client::values;
use serde_json::{json, Value as Json};

use crate::common::{complete_write, read_request, Env, Lcg, Outcome, Process};

/// Tables of this workload. A list is stored as comma-separated text.
pub const SCHEMA: &[&str] = &["CREATE TABLE lists (k int PRIMARY KEY, v text NOT NULL)"];

/// Keys in the window at any time.
const KEYS_ACTIVE: u64 = 6;
/// Transactions before the window slides by one key.
const TXNS_PER_SLIDE: u64 = 60;

fn parse_list(text: Option<&str>) -> Json {
    let items: Vec<Json> = text
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map(Json::from)
                .unwrap_or_else(|_| Json::from(s))
        })
        .collect();
    Json::Array(items)
}

/// One client process. `counter` numbers transactions and values (unique values).
pub async fn client(env: Env, slot: u64, counter: Arc<AtomicU64>) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let mut rng = Lcg::new(env.seed.wrapping_add(slot * 104_729));
    let nodes = env.addrs.len() as u64;
    while !env.stopped() {
        let _op = env.op().await;
        let t = counter.fetch_add(1, Ordering::Relaxed);
        let base = t / TXNS_PER_SLIDE;
        let read_only = rng.chance(30);
        let len = 1 + rng.next(4);
        let mut mops: Vec<(bool, i64, i64)> = Vec::new(); // (append?, key, value)
        for i in 0..len {
            let k = (base + rng.next(KEYS_ACTIVE)) as i64;
            let append = !read_only && rng.chance(50);
            mops.push((append, k, (t * 4 + i) as i64));
        }
        if !read_only && !mops.iter().any(|m| m.0) {
            mops[0].0 = true;
        }
        let invoke: Vec<Json> = mops
            .iter()
            .map(|&(a, k, v)| {
                if a {
                    json!(["append", k, v])
                } else {
                    json!(["r", k, null])
                }
            })
            .collect();
        env.history
            .push("invoke", p.id, "txn", Json::Array(invoke.clone()));
        if read_only {
            let keys: Vec<String> = mops.iter().map(|m| m.1.to_string()).collect();
            let sql = format!("SELECT k, v FROM lists WHERE k IN ({})", keys.join(","));
            let node = rng.next(nodes) as usize;
            match client
                .query_node(node, read_request(&sql, vec![], Consistency::Linearizable))
                .await
            {
                Ok(r) => {
                    let seen: BTreeMap<i64, String> = r
                        .rows
                        .iter()
                        .filter_map(|row| {
                            Some((
                                values::as_i64(&row.values[0])?,
                                values::as_str(&row.values[1])?.to_string(),
                            ))
                        })
                        .collect();
                    let done: Vec<Json> = mops
                        .iter()
                        .map(|&(_, k, _)| {
                            json!(["r", k, parse_list(seen.get(&k).map(|s| s.as_str()))])
                        })
                        .collect();
                    env.history.push("ok", p.id, "txn", Json::Array(done));
                }
                Err(e) => env.history.push_error(
                    "fail",
                    p.id,
                    "txn",
                    Json::Array(invoke),
                    Some(e.to_string()),
                ),
            }
            continue;
        }
        let statements: Vec<Statement> = mops
            .iter()
            .map(|&(a, k, v)| {
                if a {
                    Statement {
                        sql: "INSERT INTO lists (k, v) VALUES ($1, $2) \
                              ON CONFLICT (k) DO UPDATE SET v = lists.v || ',' || EXCLUDED.v"
                            .into(),
                        params: vec![values::int(k), values::text(v.to_string())],
                    }
                } else {
                    Statement {
                        sql: "SELECT v FROM lists WHERE k = $1".into(),
                        params: vec![values::int(k)],
                    }
                }
            })
            .collect();
        let r = client.execute(statements).await;
        if complete_write(&env, &mut p, "txn", Json::Array(invoke), r, |r| {
            let done: Vec<Json> = mops
                .iter()
                .zip(r.results.iter())
                .map(|(&(a, k, v), res)| {
                    if a {
                        json!(["append", k, v])
                    } else {
                        let text = res
                            .rows
                            .first()
                            .and_then(|row| row.values.first())
                            .and_then(values::as_str);
                        json!(["r", k, parse_list(text)])
                    }
                })
                .collect();
            Json::Array(done)
        }) {
            client = env.client(slot);
        }
    }
}

/// Checks the history.
pub fn check_run(env: &Env) -> Outcome {
    let ops = env.history.ops();
    let lines = crate::elle::check(&ops);
    Outcome::of(&ops, lines)
}
