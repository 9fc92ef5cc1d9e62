//! The *list-append* workload (Elle's): transactions of 1–4 micro-operations, each an append
//! of a unique integer to a key's list or a read of a key's whole list. Transactions with an
//! append are either one multi-statement write request (one log entry, atomic) or, half of
//! them, an interactive transaction (`Transaction` service) in which the client reads each
//! list it appends to and writes back the list it computed itself — a lost update or a read
//! of anything but the transaction's own serial position shows up as an anomaly; read-only
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
        if rng.chance(50) {
            let invoke = Json::Array(invoke);
            let r = match interactive(&client, &mops).await {
                Body::Committed(r, done) => r.map(|_| done),
                Body::Failed(why) => {
                    env.history
                        .push_error("fail", p.id, "txn", invoke, Some(why));
                    continue;
                }
            };
            if complete_write(&env, &mut p, "txn", invoke, r, |done| done) {
                client = env.client(slot);
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

/// How an interactive transaction went before its outcome is known.
enum Body {
    /// `Commit` was sent: its answer, and the micro-operations as completed if it committed.
    Committed(
        Result<raftpg_client::v1::CommitResponse, raftpg_client::ClientError>,
        Json,
    ),
    /// It never reached `Commit`: nothing of it committed.
    Failed(String),
}

/// Runs `mops` as an interactive transaction: every append reads the key's list and writes
/// back that list with the value appended, computed here; every read reads the list.
async fn interactive(client: &raftpg_client::Client, mops: &[(bool, i64, i64)]) -> Body {
    let txn = match client.begin().await {
        Ok(t) => t,
        Err(e) => return Body::Failed(format!("begin: {e}")),
    };
    let read = "SELECT v FROM lists WHERE k = $1";
    let write = "INSERT INTO lists (k, v) VALUES ($1, $2) \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v";
    let body = async {
        let mut done = Vec::with_capacity(mops.len());
        for &(append, k, v) in mops {
            let r = txn.execute(read, vec![values::int(k)]).await?;
            let list = r
                .rows
                .first()
                .and_then(|row| row.values.first())
                .and_then(values::as_str)
                .map(str::to_string);
            if !append {
                done.push(json!(["r", k, parse_list(list.as_deref())]));
                continue;
            }
            let new = match list.filter(|l| !l.is_empty()) {
                Some(l) => format!("{l},{v}"),
                None => v.to_string(),
            };
            txn.execute(write, vec![values::int(k), values::text(new)])
                .await?;
            done.push(json!(["append", k, v]));
        }
        Ok::<_, raftpg_client::ClientError>(Json::Array(done))
    }
    .await;
    match body {
        Ok(done) => Body::Committed(txn.commit().await, done),
        Err(e) => {
            let _ = txn.rollback().await;
            Body::Failed(e.to_string())
        }
    }
}

/// Checks the history.
pub fn check_run(env: &Env) -> Outcome {
    let ops = env.history.ops();
    let lines = crate::elle::check(&ops);
    Outcome::of(&ops, lines)
}
