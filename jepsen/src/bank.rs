//! The *bank* workload: [`ACCOUNTS`] accounts start with [`BALANCE`] each; clients transfer
//! random amounts between them — half as two UPDATEs in one write request (a CHECK keeps
//! balances non-negative, so an overdraft fails with 23514 and changes nothing), half as an
//! interactive transaction that reads both balances and writes the new values it computed
//! (a lost update or a transaction applied on a stale read changes the total) — and read all
//! balances
//! with one SELECT at a random consistency level on a random node — `LOCAL` reads included,
//! since every node applies each transfer atomically.
//! Anomalies: a read (or a node's final copy) whose total differs from the initial total, a
//! negative balance, a missing or extra account, or nodes whose final balances differ.

use std::collections::BTreeMap;

use raftpg_client::v1::Statement;
use raftpg_client::values;
use serde_json::{json, Value as Json};

use crate::common::{
    complete_write, final_reads, random_consistency, read_request, Env, Lcg, Outcome, Process,
};
use crate::history::Op;

/// Accounts.
pub const ACCOUNTS: i64 = 5;
/// Initial balance of each account.
pub const BALANCE: i64 = 100;

/// Tables of this workload and the initial balances.
pub fn schema() -> Vec<String> {
    let rows: Vec<String> = (0..ACCOUNTS).map(|i| format!("({i}, {BALANCE})")).collect();
    vec![
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0))"
            .into(),
        format!(
            "INSERT INTO accounts (id, balance) VALUES {}",
            rows.join(", ")
        ),
    ]
}

/// One client process.
pub async fn client(env: Env, slot: u64) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let mut rng = Lcg::new(env.seed.wrapping_add(slot * 15_485_863));
    let nodes = env.addrs.len() as u64;
    while !env.stopped() {
        let _op = env.op().await;
        if rng.chance(50) {
            env.history.push("invoke", p.id, "read", Json::Null);
            let node = rng.next(nodes) as usize;
            let consistency = random_consistency(&mut rng);
            let req = read_request(
                "SELECT id, balance FROM accounts ORDER BY id",
                vec![],
                consistency,
            );
            match client.query_node(node, req).await {
                Ok(r) => {
                    let balances: BTreeMap<String, i64> = r
                        .rows
                        .iter()
                        .filter_map(|row| {
                            Some((
                                values::as_i64(&row.values[0])?.to_string(),
                                values::as_i64(&row.values[1])?,
                            ))
                        })
                        .collect();
                    env.history.push("ok", p.id, "read", json!(balances));
                }
                Err(e) => {
                    env.history
                        .push_error("fail", p.id, "read", Json::Null, Some(e.to_string()))
                }
            }
            continue;
        }
        let from = rng.next(ACCOUNTS as u64) as i64;
        let to = (from + 1 + rng.next(ACCOUNTS as u64 - 1) as i64) % ACCOUNTS;
        let amount = 1 + rng.next(20) as i64;
        let value = json!({"from": from, "to": to, "amount": amount});
        if rng.chance(50) {
            let value = json!({"from": from, "to": to, "amount": amount, "interactive": true});
            env.history.push("invoke", p.id, "transfer", value.clone());
            let r = match interactive_transfer(&client, from, to, amount).await {
                Body::Committed(r) => r,
                Body::Failed(why) => {
                    env.history
                        .push_error("fail", p.id, "transfer", value, Some(why));
                    continue;
                }
            };
            if complete_write(&env, &mut p, "transfer", value.clone(), r, |_| value) {
                client = env.client(slot);
            }
            continue;
        }
        env.history.push("invoke", p.id, "transfer", value.clone());
        let r = client
            .execute(vec![
                Statement {
                    sql: "UPDATE accounts SET balance = balance - $2 WHERE id = $1".into(),
                    params: vec![values::int(from), values::int(amount)],
                },
                Statement {
                    sql: "UPDATE accounts SET balance = balance + $2 WHERE id = $1".into(),
                    params: vec![values::int(to), values::int(amount)],
                },
            ])
            .await;
        if complete_write(&env, &mut p, "transfer", value.clone(), r, |_| value) {
            client = env.client(slot);
        }
    }
}

/// How an interactive transfer went before its outcome is known.
enum Body {
    /// `Commit` was sent: its answer.
    Committed(Result<raftpg_client::v1::CommitResponse, raftpg_client::ClientError>),
    /// It never reached `Commit` (an overdraft, or an error before): nothing of it committed.
    Failed(String),
}

/// A transfer as an interactive transaction: read the balance of `from`, write it minus
/// `amount` (unless that overdraws it), read the balance of `to`, write it plus `amount`,
/// commit. The values written are the client's, computed from what it read.
async fn interactive_transfer(
    client: &raftpg_client::Client,
    from: i64,
    to: i64,
    amount: i64,
) -> Body {
    let txn = match client.begin().await {
        Ok(t) => t,
        Err(e) => return Body::Failed(format!("begin: {e}")),
    };
    let balance = |r: &raftpg_client::v1::StatementResult| {
        r.rows
            .first()
            .and_then(|row| row.values.first())
            .and_then(values::as_i64)
    };
    let body = async {
        let read = "SELECT balance FROM accounts WHERE id = $1";
        let write = "UPDATE accounts SET balance = $2 WHERE id = $1";
        let from_balance = balance(&txn.execute(read, vec![values::int(from)]).await?);
        let Some(from_balance) = from_balance.filter(|b| *b >= amount) else {
            return Ok(false);
        };
        txn.execute(
            write,
            vec![values::int(from), values::int(from_balance - amount)],
        )
        .await?;
        let to_balance = balance(&txn.execute(read, vec![values::int(to)]).await?).unwrap_or(0);
        txn.execute(
            write,
            vec![values::int(to), values::int(to_balance + amount)],
        )
        .await?;
        Ok::<_, raftpg_client::ClientError>(true)
    }
    .await;
    match body {
        Ok(true) => Body::Committed(txn.commit().await),
        Ok(false) => {
            let _ = txn.rollback().await;
            Body::Failed("overdraft".into())
        }
        Err(e) => {
            let _ = txn.rollback().await;
            Body::Failed(e.to_string())
        }
    }
}

/// Checks one set of balances; `what` names it in anomaly lines.
fn check_balances(what: &str, balances: &BTreeMap<String, i64>, out: &mut Vec<String>) {
    let total: i64 = balances.values().sum();
    if balances.len() as i64 != ACCOUNTS {
        out.push(format!(
            "{what}: {} accounts instead of {ACCOUNTS}: {balances:?}",
            balances.len()
        ));
    } else if total != ACCOUNTS * BALANCE {
        out.push(format!(
            "{what}: total {total} instead of {}: {balances:?}",
            ACCOUNTS * BALANCE
        ));
    }
    if balances.values().any(|b| *b < 0) {
        out.push(format!("{what}: negative balance: {balances:?}"));
    }
}

/// Checks every ok read of a history.
pub fn check(history: &[Op]) -> Vec<String> {
    let mut out = Vec::new();
    for op in history.iter().filter(|o| o.f == "read" && o.kind == "ok") {
        let balances: BTreeMap<String, i64> = match serde_json::from_value(op.value.clone()) {
            Ok(b) => b,
            Err(e) => {
                out.push(format!("malformed read value {}: {e}", op.value));
                continue;
            }
        };
        let what = format!(
            "read by process {} at {} ms",
            op.process,
            op.time / 1_000_000
        );
        check_balances(&what, &balances, &mut out);
    }
    out
}

/// Checks the history and every node's final balances.
pub async fn check_run(
    env: &Env,
    admin: &raftpg_client::Client,
    marker: u64,
) -> anyhow::Result<Outcome> {
    let ops = env.history.ops();
    let mut lines = check(&ops);
    let finals = final_reads(
        admin,
        env.addrs.len(),
        "SELECT id, balance FROM accounts",
        marker,
    )
    .await?;
    let mut first: Option<(u64, BTreeMap<String, i64>)> = None;
    for (node, rows) in finals {
        let balances: BTreeMap<String, i64> = rows
            .iter()
            .filter_map(|r| {
                Some((
                    values::as_i64(&r.values[0])?.to_string(),
                    values::as_i64(&r.values[1])?,
                ))
            })
            .collect();
        check_balances(&format!("node {node} final"), &balances, &mut lines);
        match &first {
            None => first = Some((node, balances)),
            Some((n, b)) if *b != balances => lines.push(format!(
                "nodes {n} and {node} diverge: {b:?} vs {balances:?}"
            )),
            Some(_) => {}
        }
    }
    Ok(Outcome::of(&ops, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(balances: &[i64]) -> Op {
        let m: BTreeMap<String, i64> = balances
            .iter()
            .enumerate()
            .map(|(i, b)| (i.to_string(), *b))
            .collect();
        Op {
            kind: "ok".into(),
            process: 0,
            f: "read".into(),
            value: json!(m),
            time: 0,
        }
    }

    #[test]
    fn conserved_totals_pass_and_broken_ones_are_caught() {
        assert!(check(&[
            read(&[100, 100, 100, 100, 100]),
            read(&[90, 110, 100, 50, 150])
        ])
        .is_empty());
        assert!(check(&[read(&[90, 100, 100, 100, 100])])[0].contains("total 490"));
        assert!(check(&[read(&[-10, 110, 100, 100, 200])])[0].contains("negative"));
        assert!(check(&[read(&[100, 100, 100, 100])])[0].contains("4 accounts"));
    }
}
