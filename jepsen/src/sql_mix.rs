//! The *sql-mix* workload: writes shaped like what real applications send, which the other
//! workloads never do:
//! - **deferred foreign keys**: `mix_child.parent_id REFERENCES mix_parent DEFERRABLE INITIALLY
//!   DEFERRED`. A `family` write inserts the child *before* its parent in one request (valid at
//!   commit: must succeed); an `orphan` write inserts a parent, a child of it and a child of a
//!   parent that never exists (must fail with SQLSTATE 23503 as the write's own result, leave
//!   none of its rows, and never wedge the cluster);
//! - **sequences restarted mid-run**: a `restart` write runs `ALTER SEQUENCE ... RESTART WITH n`
//!   (n = epoch × [`EPOCH`]) followed by an insert that must get id n; every other insert uses
//!   the `bigserial` too;
//! - **`SET LOCAL` inside writes**: `SET LOCAL work_mem`, `SET LOCAL TimeZone` (the insert's
//!   `now()::text` default must show that zone's offset) and `SET LOCAL search_path = mix_alt,
//!   public` (the unqualified `mix_where` must be `mix_alt.mix_where`), and *later* writes
//!   without them that behave differently if a setting leaked (their `now()::text` must show
//!   `+00`, their `mix_where` must be `public.mix_where`);
//! - **column defaults with non-deterministic functions**: `DEFAULT now()`, `DEFAULT
//!   (now()::text)`, `DEFAULT random()`, `DEFAULT gen_random_uuid()` (raftpg stores them as its
//!   deterministic versions); `RETURNING` gives each insert's values.
//!
//! Reads: `LINEARIZABLE` or `AT_LEAST(index)` reads, on a random node, of the process's last
//! acknowledged insert.
//!
//! Checker: acknowledged inserts present on every node with exactly the id and values their
//! `RETURNING` gave; definitely failed writes absent; orphan writes failed with 23503 and left
//! nothing; family writes succeeded and both rows are there; no child without its parent;
//! settings took effect inside their write and never outside it; `random()` in [0, 1), v4
//! UUIDs, all distinct; timestamps never go backwards in real time; ids follow the sequence's
//! restarts (an insert's id comes from the restart in force: never from an epoch a later
//! restart ended, never from one that had not started) and grow within an epoch in real time;
//! reads see the acknowledged insert; nodes identical. (`raftpg check` runs after every run too.)
//!
//! Orders are real-time orders (an operation that completed before another was invoked), never
//! log indexes: a retried write is answered with its first outcome under the retry's index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use raftpg_client::v1::value::Kind;
use raftpg_client::v1::{Consistency, QueryRequest, Statement, Value};
use raftpg_client::values;
use serde_json::{json, Value as Json};

use crate::common::{classify, final_reads, Env, Failure, Lcg, Outcome, Process};
use crate::history::Op;

/// Tables of this workload.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE mix_parent (id bigint PRIMARY KEY, note text NOT NULL)",
    "CREATE TABLE mix_child (id bigint PRIMARY KEY, parent_id bigint NOT NULL \
     REFERENCES mix_parent (id) DEFERRABLE INITIALLY DEFERRED, note text NOT NULL)",
    "CREATE TABLE mix_items (id bigserial PRIMARY KEY, k text NOT NULL UNIQUE, \
     created_at timestamptz NOT NULL DEFAULT now(), \
     shown text NOT NULL DEFAULT (now()::text), \
     r float8 NOT NULL DEFAULT random(), \
     u uuid NOT NULL DEFAULT gen_random_uuid())",
    "CREATE SCHEMA mix_alt",
    "CREATE TABLE mix_where (k text PRIMARY KEY, place text NOT NULL DEFAULT 'public')",
    "CREATE TABLE mix_alt.mix_where (k text PRIMARY KEY, place text NOT NULL DEFAULT 'mix_alt')",
];

/// Set (to anything) to leave orphan writes out (to look past a cluster they wedge).
pub const NO_ORPHANS_ENV: &str = "RAFTPG_JEPSEN_NO_ORPHANS";

/// A restart to epoch `e` restarts the sequence at `e * EPOCH`.
pub const EPOCH: i64 = 1_000_000;

/// The zone of `SET LOCAL TimeZone` writes and the offset `now()::text` shows in it.
const ZONE: &str = "Asia/Kolkata";
const ZONE_OFFSET: &str = "+05:30";
/// The applier's own zone (UTC) as `timestamptz::text` shows it.
const UTC_OFFSET: &str = "+00";

const INSERT_SQL: &str =
    "INSERT INTO mix_items (k) VALUES ($1) RETURNING id, created_at, shown, r, u";

fn stmt(sql: &str, params: Vec<Value>) -> Statement {
    Statement {
        sql: sql.into(),
        params,
    }
}

/// One client process. `epochs` numbers the sequence restarts of the run.
pub async fn client(env: Env, slot: u64, epochs: Arc<AtomicU64>) {
    let mut p = Process::new(slot, env.clients);
    let mut client = env.client(slot);
    let mut rng = Lcg::new(env.seed.wrapping_add(slot * 48_611));
    let nodes = env.addrs.len() as u64;
    let mut n: i64 = 0;
    let next_id = |n: &mut i64| {
        *n += 1;
        slot as i64 * 1_000_000_000 + *n
    };
    // The last acknowledged insert of this process: key, id, log index.
    let mut last: Option<(String, i64, u64)> = None;
    // Orphan writes wedge a cluster whose applier mistakes a deferred constraint's failure at
    // COMMIT for an environmental error; this looks past that at the rest.
    let orphans = std::env::var_os(NO_ORPHANS_ENV).is_none();
    while !env.stopped() {
        let _op = env.op().await;
        let dice = match rng.next(100) {
            // No insert to read yet: insert.
            d if d >= 85 && last.is_none() => 0,
            d if (55..=57).contains(&d) && !orphans => 40,
            d => d,
        };
        let (f, invoke, statements) = match dice {
            0..=37 => {
                let k = format!("{slot}-{}", next_id(&mut n));
                let mut s = Vec::new();
                let tz = rng.chance(20);
                if rng.chance(50) {
                    s.push(stmt("SET LOCAL work_mem = '8MB'", vec![]));
                }
                if tz {
                    s.push(stmt(&format!("SET LOCAL TimeZone = '{ZONE}'"), vec![]));
                }
                s.push(stmt(INSERT_SQL, vec![values::text(k.clone())]));
                ("insert", json!({"k": k, "tz": tz}), s)
            }
            38..=39 => {
                let k = format!("{slot}-{}", next_id(&mut n));
                let epoch = epochs.fetch_add(1, Ordering::Relaxed) as i64 + 1;
                let s = vec![
                    stmt(
                        &format!(
                            "ALTER SEQUENCE mix_items_id_seq RESTART WITH {}",
                            epoch * EPOCH
                        ),
                        vec![],
                    ),
                    stmt(INSERT_SQL, vec![values::text(k.clone())]),
                ];
                ("restart", json!({"k": k, "tz": false, "epoch": epoch}), s)
            }
            40..=54 => {
                let (parent, child) = (next_id(&mut n), next_id(&mut n));
                let s = vec![
                    stmt(
                        "INSERT INTO mix_child (id, parent_id, note) VALUES ($1, $2, 'child first')",
                        vec![values::int(child), values::int(parent)],
                    ),
                    stmt(
                        "INSERT INTO mix_parent (id, note) VALUES ($1, 'parent second')",
                        vec![values::int(parent)],
                    ),
                ];
                ("family", json!({"parent": parent, "child": child}), s)
            }
            55..=57 => {
                let (parent, child, bad) = (next_id(&mut n), next_id(&mut n), next_id(&mut n));
                let s = vec![
                    stmt(
                        "INSERT INTO mix_parent (id, note) VALUES ($1, 'doomed')",
                        vec![values::int(parent)],
                    ),
                    stmt(
                        "INSERT INTO mix_child (id, parent_id, note) VALUES ($1, $2, 'doomed')",
                        vec![values::int(child), values::int(parent)],
                    ),
                    stmt(
                        "INSERT INTO mix_child (id, parent_id, note) VALUES ($1, $2, 'orphan')",
                        vec![values::int(bad), values::int(-bad)],
                    ),
                ];
                (
                    "orphan",
                    json!({"parent": parent, "child": child, "bad_child": bad, "missing_parent": -bad}),
                    s,
                )
            }
            58..=84 => {
                let k = format!("{slot}-{}", next_id(&mut n));
                let alt = dice < 68;
                let mut s = Vec::new();
                if alt {
                    s.push(stmt("SET LOCAL search_path = mix_alt, public", vec![]));
                }
                s.push(stmt(
                    "INSERT INTO mix_where (k) VALUES ($1) RETURNING place",
                    vec![values::text(k.clone())],
                ));
                ("path", json!({"k": k, "alt": alt}), s)
            }
            _ => {
                // A read of this process's last acknowledged insert.
                let Some((k, id, index)) = last.clone() else {
                    continue;
                };
                let node = rng.next(nodes) as usize;
                let at_least = rng.chance(50);
                let value = json!({"k": k, "id": id, "index": index, "at_least": at_least});
                env.history.push("invoke", p.id, "read", value.clone());
                let req = QueryRequest {
                    sql: "SELECT id FROM mix_items WHERE k = $1".into(),
                    params: vec![values::text(k.clone())],
                    consistency: if at_least {
                        Consistency::AtLeast as i32
                    } else {
                        Consistency::Linearizable as i32
                    },
                    min_index: if at_least { index } else { 0 },
                    timeout_ms: 2_000,
                    ..Default::default()
                };
                match client.query_node(node, req).await {
                    Ok(r) => {
                        let seen = r
                            .rows
                            .first()
                            .and_then(|row| row.values.first())
                            .and_then(values::as_i64);
                        let mut v = value;
                        v["seen"] = json!(seen);
                        v["node"] = json!(r.node_id);
                        v["applied_index"] = json!(r.applied_index);
                        env.history.push("ok", p.id, "read", v);
                    }
                    Err(e) => {
                        env.history
                            .push_error("fail", p.id, "read", value, Some(e.to_string()))
                    }
                }
                continue;
            }
        };
        env.history.push("invoke", p.id, f, invoke.clone());
        let r = client.execute(statements).await;
        match r {
            Ok(resp) => {
                let mut v = invoke;
                v["index"] = json!(resp.log_index);
                // The last statement's RETURNING row.
                let row = resp
                    .results
                    .last()
                    .and_then(|s| s.rows.first())
                    .map(|r| r.values.clone())
                    .unwrap_or_default();
                match f {
                    "insert" | "restart" => {
                        let item = Item::from_values(&row);
                        if let (Some(item), Some(k)) = (&item, v["k"].as_str()) {
                            last = Some((k.to_string(), item.id, resp.log_index));
                        }
                        v["item"] = json!(item);
                    }
                    "path" => v["place"] = json!(row.first().and_then(values::as_str)),
                    _ => {}
                }
                env.history.push("ok", p.id, f, v);
            }
            Err(e) => {
                let mut v = invoke;
                v["sqlstate"] = json!(e.sqlstate());
                if classify(&e) == Failure::Fail {
                    env.history
                        .push_error("fail", p.id, f, v, Some(e.to_string()));
                } else {
                    env.history
                        .push_error("info", p.id, f, v, Some(e.to_string()));
                    p.retire();
                    client = env.client(slot);
                }
            }
        }
    }
}

/// One row of `mix_items` (without its key), as `RETURNING` gave it or a node holds it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    pub id: i64,
    /// `created_at` in microseconds since the epoch.
    pub at: i64,
    /// `now()::text` as the insert's session showed it.
    pub shown: String,
    /// `random()`, as text (exact).
    pub r: String,
    pub u: String,
}

impl Item {
    /// From `id, created_at, shown, r, u`.
    fn from_values(v: &[Value]) -> Option<Item> {
        let at = match v.get(1)?.kind {
            Some(Kind::TimestamptzMicros(t)) => t,
            _ => return None,
        };
        Some(Item {
            id: values::as_i64(v.first()?)?,
            at,
            shown: values::as_str(v.get(2)?)?.to_string(),
            r: values::display(v.get(3)?),
            u: values::as_str(v.get(4)?)?.to_string(),
        })
    }
}

/// One node's final copy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Copy {
    /// `mix_items` by key.
    pub items: BTreeMap<String, Item>,
    pub parents: BTreeSet<i64>,
    /// Child id → parent id.
    pub children: BTreeMap<i64, i64>,
    /// `mix_where` keys → the schema holding them.
    pub places: BTreeMap<String, String>,
}

/// Acknowledged inserts' keys (for the idle reads of the pg-kill-idle nemesis).
pub fn acked(ops: &[Op]) -> BTreeSet<String> {
    ops.iter()
        .filter(|o| o.kind == "ok" && (o.f == "insert" || o.f == "restart"))
        .filter_map(|o| o.value["k"].as_str().map(str::to_string))
        .collect()
}

/// Anomalies by kind: the first few examples and the total.
#[derive(Default)]
struct Findings(BTreeMap<String, (usize, Vec<String>)>);

impl Findings {
    fn add(&mut self, kind: &str, example: String) {
        let e = self.0.entry(kind.to_string()).or_default();
        e.0 += 1;
        if e.1.len() < 3 {
            e.1.push(example);
        }
    }

    /// One line per kind (with up to 3 examples), then "... and N more <kind>" so that
    /// [`Outcome::of`] counts every anomaly.
    fn lines(self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, (count, examples)) in self.0 {
            out.push(format!("{kind}: {}", examples.join("; ")));
            if count > 1 {
                out.push(format!("... and {} more {kind}", count - 1));
            }
        }
        out
    }
}

/// An operation with its completion.
struct Done<'a> {
    f: &'a str,
    kind: &'a str,
    invoked: u64,
    /// Completion time (`u64::MAX` if it never completed).
    completed: u64,
    value: &'a Json,
}

/// Pairs invocations with completions.
fn pair(history: &[Op]) -> Vec<Done<'_>> {
    let mut open: BTreeMap<u64, usize> = BTreeMap::new();
    let mut out: Vec<Done> = Vec::new();
    for op in history {
        if op.kind == "invoke" {
            open.insert(op.process, out.len());
            out.push(Done {
                f: &op.f,
                kind: "info",
                invoked: op.time,
                completed: u64::MAX,
                value: &op.value,
            });
        } else if let Some(i) = open.remove(&op.process) {
            out[i].kind = &op.kind;
            out[i].value = &op.value;
            if op.kind != "info" {
                out[i].completed = op.time;
            }
        }
    }
    out
}

fn item_of(v: &Json) -> Option<Item> {
    serde_json::from_value(v.get("item")?.clone()).ok()
}

fn is_v4_uuid(u: &str) -> bool {
    let b = u.as_bytes();
    b.len() == 36
        && [8, 13, 18, 23].iter().all(|i| b[*i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && u.chars()
            .filter(|c| *c != '-')
            .all(|c| c.is_ascii_hexdigit())
}

/// Whether a failed write's error is a SQL result (a SQLSTATE outside the classes of the
/// environment: connection, resources, operator intervention, system, internal), rather than
/// a refusal for want of resources or a failure without a SQLSTATE.
fn is_result(v: &Json) -> bool {
    v["sqlstate"].as_str().is_some_and(|s| {
        !["08", "53", "57", "58", "XX"]
            .iter()
            .any(|class| s.starts_with(class))
    })
}

/// Checks a history (and, when given, every node's final copy).
pub fn check(history: &[Op], finals: &BTreeMap<u64, Copy>) -> Vec<String> {
    let ops = pair(history);
    let mut f = Findings::default();

    // Per-operation expectations.
    for o in &ops {
        let v = o.value;
        match (o.f, o.kind) {
            ("insert" | "restart", "ok") => {
                let Some(item) = item_of(v) else {
                    f.add(
                        "insert acknowledged without its RETURNING row",
                        v.to_string(),
                    );
                    continue;
                };
                let tz = v["tz"].as_bool() == Some(true);
                let want = if tz { ZONE_OFFSET } else { UTC_OFFSET };
                if !item.shown.ends_with(want) {
                    let kind = if tz {
                        "SET LOCAL TimeZone had no effect inside its write"
                    } else {
                        "a TimeZone set by another write leaked into this one"
                    };
                    f.add(
                        kind,
                        format!("{} shows {:?}, expected offset {want}", v["k"], item.shown),
                    );
                }
                match item.r.parse::<f64>() {
                    Ok(r) if (0.0..1.0).contains(&r) => {}
                    _ => f.add(
                        "DEFAULT random() out of [0, 1)",
                        format!("{} r = {}", v["k"], item.r),
                    ),
                }
                if !is_v4_uuid(&item.u) {
                    f.add(
                        "DEFAULT gen_random_uuid() not a v4 UUID",
                        format!("{} u = {}", v["k"], item.u),
                    );
                }
                if o.f == "restart" {
                    let want = v["epoch"].as_i64().unwrap_or(0) * EPOCH;
                    if item.id != want {
                        f.add(
                            "insert right after ALTER SEQUENCE RESTART did not get the restart value",
                            format!("{} got id {}, restarted at {want}", v["k"], item.id),
                        );
                    }
                }
            }
            ("family", "fail") if is_result(v) => f.add(
                "valid deferred-FK write (child before parent) failed",
                format!("{v}"),
            ),
            ("orphan", "ok") => f.add(
                "write violating a deferred foreign key was acknowledged",
                format!("{v}"),
            ),
            ("orphan", "fail") if is_result(v) && v["sqlstate"].as_str() != Some("23503") => f.add(
                "write violating a deferred foreign key failed with another SQLSTATE than 23503",
                format!("{v}"),
            ),
            ("path", "ok") => {
                let alt = v["alt"].as_bool() == Some(true);
                let want = if alt { "mix_alt" } else { "public" };
                if v["place"].as_str() != Some(want) {
                    let kind = if alt {
                        "SET LOCAL search_path had no effect inside its write"
                    } else {
                        "a search_path set by another write leaked into this one"
                    };
                    f.add(
                        kind,
                        format!("{} went to {}, expected {want}", v["k"], v["place"]),
                    );
                }
            }
            ("read", "ok") if v["seen"].as_i64() != v["id"].as_i64() => f.add(
                if v["at_least"].as_bool() == Some(true) {
                    "AT_LEAST(index of the write) read missed the acknowledged insert"
                } else {
                    "LINEARIZABLE read missed an insert acknowledged before it began"
                },
                format!("{v}"),
            ),
            _ => {}
        }
    }

    // Real-time orders: timestamps never go backwards; ids grow within an epoch.
    let mut inserts: Vec<(&Done, Item)> = ops
        .iter()
        .filter(|o| o.kind == "ok" && (o.f == "insert" || o.f == "restart"))
        .filter_map(|o| Some((o, item_of(o.value)?)))
        .collect();
    inserts.sort_by_key(|(o, _)| o.invoked);
    let mut by_completion: Vec<usize> = (0..inserts.len()).collect();
    by_completion.sort_by_key(|i| inserts[*i].0.completed);
    let mut j = 0;
    // The latest timestamp, and the largest id per epoch, of inserts completed so far.
    let mut max_at: Option<(i64, &Json)> = None;
    let mut max_id: BTreeMap<i64, (i64, &Json)> = BTreeMap::new();
    for (o, it) in &inserts {
        while j < by_completion.len() && inserts[by_completion[j]].0.completed < o.invoked {
            let (po, pit) = &inserts[by_completion[j]];
            if max_at.map(|m| pit.at > m.0).unwrap_or(true) {
                max_at = Some((pit.at, &po.value["k"]));
            }
            let e = max_id
                .entry(pit.id / EPOCH)
                .or_insert((i64::MIN, &Json::Null));
            if pit.id > e.0 {
                *e = (pit.id, &po.value["k"]);
            }
            j += 1;
        }
        if let Some((at, k)) = max_at {
            if it.at < at {
                f.add(
                    "timestamp went backwards: an insert got an earlier now() than one acknowledged before it began",
                    format!("{} at {} µs < {k} at {at} µs", o.value["k"], it.at),
                );
            }
        }
        if let Some((id, k)) = max_id.get(&(it.id / EPOCH)) {
            if it.id <= *id {
                f.add(
                    "serial id did not grow: an insert got a smaller id than one acknowledged before it began (same epoch)",
                    format!("{} id {} <= {k} id {id}", o.value["k"], it.id),
                );
            }
        }
    }

    // Sequence restarts: the epoch of each insert's id.
    let restarts: Vec<(&Done, i64)> = ops
        .iter()
        .filter(|o| o.f == "restart")
        .filter_map(|o| Some((o, o.value["epoch"].as_i64()?)))
        .collect();
    let by_epoch: BTreeMap<i64, &Done> = restarts.iter().map(|(o, e)| (*e, *o)).collect();
    for (o, it) in &inserts {
        let e = it.id / EPOCH;
        let k = &o.value["k"];
        // Restarts that certainly took effect before this insert.
        let before: Vec<&(&Done, i64)> = restarts
            .iter()
            .filter(|(r, _)| r.kind == "ok" && r.completed < o.invoked)
            .collect();
        if e == 0 {
            if let Some((_, re)) = before.first() {
                f.add(
                    "serial id from before every restart, after a restart was acknowledged",
                    format!("{k} got id {} after the restart to epoch {re}", it.id),
                );
            }
            continue;
        }
        let Some(r) = by_epoch.get(&e) else {
            f.add(
                "serial id from no restart",
                format!("{k} got id {} (epoch {e})", it.id),
            );
            continue;
        };
        if r.kind == "fail" {
            f.add(
                "serial id from a restart that failed",
                format!("{k} got id {} (epoch {e})", it.id),
            );
        } else if r.invoked > o.completed {
            f.add(
                "serial id from a restart that had not begun",
                format!("{k} got id {} (epoch {e})", it.id),
            );
        } else if let Some((_, later)) = before
            .iter()
            .find(|(y, _)| y.invoked > r.completed && !std::ptr::eq(*y, *r))
        {
            f.add(
                "serial id from a sequence epoch that a later acknowledged restart had ended",
                format!(
                    "{k} got id {} (epoch {e}) after the restart to epoch {later}",
                    it.id
                ),
            );
        }
    }

    // Distinct values across all acknowledged inserts.
    let mut uuids: BTreeMap<&str, &Json> = BTreeMap::new();
    let mut ids: BTreeMap<i64, &Json> = BTreeMap::new();
    for (o, it) in &inserts {
        if let Some(other) = uuids.insert(&it.u, &o.value["k"]) {
            f.add(
                "two inserts got the same gen_random_uuid()",
                format!("{} and {} got {}", other, o.value["k"], it.u),
            );
        }
        if let Some(other) = ids.insert(it.id, &o.value["k"]) {
            f.add(
                "two acknowledged inserts got the same id",
                format!("{} and {} got {}", other, o.value["k"], it.id),
            );
        }
    }

    // Final copies.
    let invoked_keys: BTreeSet<&str> = ops.iter().filter_map(|o| o.value["k"].as_str()).collect();
    for (node, copy) in finals {
        for o in &ops {
            let v = o.value;
            match o.f {
                "insert" | "restart" => {
                    let Some(k) = v["k"].as_str() else { continue };
                    let held = copy.items.get(k);
                    match (o.kind, held) {
                        ("ok", None) => {
                            f.add("acknowledged insert missing", format!("node {node}: {k}"))
                        }
                        ("ok", Some(h)) => {
                            if let Some(it) = item_of(v) {
                                if *h != it {
                                    f.add(
                                        "row differs from what its acknowledgement returned",
                                        format!(
                                            "node {node}: {k} holds {h:?}, acknowledged {it:?}"
                                        ),
                                    );
                                }
                            }
                        }
                        ("fail", Some(_)) => {
                            f.add("insert that failed is present", format!("node {node}: {k}"))
                        }
                        _ => {}
                    }
                }
                "family" => {
                    let (Some(pa), Some(ch)) = (v["parent"].as_i64(), v["child"].as_i64()) else {
                        continue;
                    };
                    let present = (copy.parents.contains(&pa), copy.children.get(&ch));
                    match (o.kind, present) {
                        ("ok", (true, Some(p))) if *p == pa => {}
                        ("ok", _) => f.add(
                            "acknowledged family write (child before parent) incomplete",
                            format!(
                                "node {node}: parent {pa} present {}, child {ch} → {:?}",
                                present.0, present.1
                            ),
                        ),
                        ("fail", (false, None)) => {}
                        ("fail", _) => f.add(
                            "family write that failed left rows",
                            format!(
                                "node {node}: parent {pa} present {}, child {ch} → {:?}",
                                present.0, present.1
                            ),
                        ),
                        _ => {}
                    }
                }
                "orphan" => {
                    let ids: Vec<i64> = ["parent", "child", "bad_child"]
                        .iter()
                        .filter_map(|n| v[*n].as_i64())
                        .collect();
                    let (pa, ch, bad) = (ids[0], ids[1], ids[2]);
                    if copy.parents.contains(&pa)
                        || copy.children.contains_key(&ch)
                        || copy.children.contains_key(&bad)
                    {
                        f.add(
                            "rows of a write violating a deferred foreign key are present",
                            format!("node {node}: parent {pa}, children {ch}, {bad}"),
                        );
                    }
                }
                "path" => {
                    let Some(k) = v["k"].as_str() else { continue };
                    match (o.kind, copy.places.get(k)) {
                        ("ok", None) => f.add(
                            "acknowledged mix_where insert missing",
                            format!("node {node}: {k}"),
                        ),
                        ("ok", Some(place)) if Some(place.as_str()) != v["place"].as_str() => f
                            .add(
                                "mix_where row in another schema than acknowledged",
                                format!("node {node}: {k} in {place}, acknowledged {}", v["place"]),
                            ),
                        ("fail", Some(_)) => f.add(
                            "mix_where insert that failed is present",
                            format!("node {node}: {k}"),
                        ),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        for (child, parent) in &copy.children {
            if !copy.parents.contains(parent) {
                f.add(
                    "child without its parent (deferred foreign key violated)",
                    format!("node {node}: child {child} → parent {parent}"),
                );
            }
        }
        for k in copy.items.keys().chain(copy.places.keys()) {
            if !invoked_keys.contains(k.as_str()) {
                f.add("row of a write never sent", format!("node {node}: {k}"));
            }
        }
        let mut seen = BTreeSet::new();
        for (k, it) in &copy.items {
            if !seen.insert(&it.u) {
                f.add(
                    "duplicate gen_random_uuid() in a copy",
                    format!("node {node}: {k} {}", it.u),
                );
            }
        }
    }
    let mut copies = finals.iter();
    if let Some((n0, c0)) = copies.next() {
        for (n, c) in copies {
            if c != c0 {
                f.add(
                    "nodes diverge",
                    format!(
                        "nodes {n0} and {n}: {} vs {} items, {} vs {} parents, {} vs {} children, {} vs {} mix_where rows (or different values)",
                        c0.items.len(),
                        c.items.len(),
                        c0.parents.len(),
                        c.parents.len(),
                        c0.children.len(),
                        c.children.len(),
                        c0.places.len(),
                        c.places.len()
                    ),
                );
            }
        }
    }
    f.lines()
}

/// Reads every node's copy and checks the history.
pub async fn check_run(
    env: &Env,
    admin: &raftpg_client::Client,
    marker: u64,
) -> anyhow::Result<Outcome> {
    let nodes = env.addrs.len();
    let items = final_reads(
        admin,
        nodes,
        "SELECT id, created_at, shown, r, u, k FROM mix_items",
        marker,
    )
    .await?;
    let parents = final_reads(admin, nodes, "SELECT id FROM mix_parent", marker).await?;
    let children = final_reads(admin, nodes, "SELECT id, parent_id FROM mix_child", marker).await?;
    let places = final_reads(
        admin,
        nodes,
        "SELECT k, place FROM public.mix_where UNION ALL SELECT k, place FROM mix_alt.mix_where",
        marker,
    )
    .await?;
    let mut finals: BTreeMap<u64, Copy> = BTreeMap::new();
    for (node, rows) in items {
        let c = finals.entry(node).or_default();
        for r in rows {
            if let (Some(item), Some(k)) = (
                Item::from_values(&r.values),
                r.values.get(5).and_then(values::as_str),
            ) {
                c.items.insert(k.to_string(), item);
            }
        }
    }
    for (node, rows) in parents {
        let c = finals.entry(node).or_default();
        c.parents = rows
            .iter()
            .filter_map(|r| values::as_i64(r.values.first()?))
            .collect();
    }
    for (node, rows) in children {
        let c = finals.entry(node).or_default();
        c.children = rows
            .iter()
            .filter_map(|r| {
                Some((
                    values::as_i64(r.values.first()?)?,
                    values::as_i64(r.values.get(1)?)?,
                ))
            })
            .collect();
    }
    for (node, rows) in places {
        let c = finals.entry(node).or_default();
        for r in rows {
            if let (Some(k), Some(p)) = (
                r.values.first().and_then(values::as_str),
                r.values.get(1).and_then(values::as_str),
            ) {
                if let Some(old) = c.places.insert(k.to_string(), p.to_string()) {
                    // In both schemas: report it as a place that cannot match.
                    c.places.insert(k.to_string(), format!("{old}+{p}"));
                }
            }
        }
    }
    let ops = env.history.ops();
    let lines = check(&ops, &finals);
    Ok(Outcome::of(&ops, lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history under construction: each operation invoked and completed in turn, at
    /// increasing times, by process 0.
    #[derive(Default)]
    struct H(Vec<Op>);

    impl H {
        fn op(&mut self, f: &str, kind: &str, invoke: Json, done: Json) -> &mut Self {
            let t = self.0.len() as u64 * 10;
            for (k, v, t) in [("invoke", invoke, t), (kind, done, t + 5)] {
                self.0.push(Op {
                    kind: k.into(),
                    process: 0,
                    f: f.into(),
                    value: v,
                    time: t,
                });
            }
            self
        }

        fn insert(&mut self, k: &str, tz: bool, it: &Item) -> &mut Self {
            let inv = json!({"k": k, "tz": tz});
            let mut ok = inv.clone();
            ok["item"] = json!(it);
            self.op("insert", "ok", inv, ok)
        }

        fn restart(&mut self, k: &str, epoch: i64, it: &Item) -> &mut Self {
            let inv = json!({"k": k, "tz": false, "epoch": epoch});
            let mut ok = inv.clone();
            ok["item"] = json!(it);
            self.op("restart", "ok", inv, ok)
        }
    }

    fn item(id: i64, at: i64, offset: &str, u: u8) -> Item {
        Item {
            id,
            at,
            shown: format!("2026-01-01 00:00:00{offset}"),
            r: "0.5".into(),
            u: format!("00000000-0000-4000-8000-0000000000{u:02x}"),
        }
    }

    /// A correct history and the copy it leaves.
    fn good() -> (H, Copy) {
        let mut h = H::default();
        let (a, b, c, d) = (
            item(1, 100, "+00", 1),
            item(2, 100, "+05:30", 2),
            item(EPOCH, 200, "+00", 3),
            item(EPOCH + 1, 300, "+00", 4),
        );
        h.insert("a", false, &a)
            .insert("b", true, &b)
            .restart("c", 1, &c)
            .insert("d", false, &d);
        h.op(
            "family",
            "ok",
            json!({"parent": 10, "child": 11}),
            json!({"parent": 10, "child": 11}),
        );
        let orphan = json!({"parent": 20, "child": 21, "bad_child": 22, "missing_parent": -22});
        let mut failed = orphan.clone();
        failed["sqlstate"] = json!("23503");
        h.op("orphan", "fail", orphan, failed);
        h.op(
            "path",
            "ok",
            json!({"k": "p", "alt": true}),
            json!({"k": "p", "alt": true, "place": "mix_alt"}),
        );
        h.op(
            "path",
            "ok",
            json!({"k": "q", "alt": false}),
            json!({"k": "q", "alt": false, "place": "public"}),
        );
        h.op(
            "read",
            "ok",
            json!({"k": "d", "id": EPOCH + 1}),
            json!({"k": "d", "id": EPOCH + 1, "seen": EPOCH + 1}),
        );
        let copy = Copy {
            items: [("a", a), ("b", b), ("c", c), ("d", d)]
                .into_iter()
                .map(|(k, i)| (k.to_string(), i))
                .collect(),
            parents: [10].into(),
            children: [(11, 10)].into(),
            places: [("p", "mix_alt"), ("q", "public")]
                .into_iter()
                .map(|(k, p)| (k.to_string(), p.to_string()))
                .collect(),
        };
        (h, copy)
    }

    fn finals(c: &Copy) -> BTreeMap<u64, Copy> {
        BTreeMap::from([(1, c.clone()), (2, c.clone())])
    }

    fn expect(lines: &[String], what: &str) {
        assert!(
            lines.iter().any(|l| l.contains(what)),
            "expected {what:?} in {lines:#?}"
        );
    }

    #[test]
    fn a_correct_history_passes() {
        let (h, c) = good();
        assert_eq!(check(&h.0, &finals(&c)), Vec::<String>::new());
        assert_eq!(check(&h.0, &BTreeMap::new()), Vec::<String>::new());
    }

    #[test]
    fn leaked_and_ignored_settings_are_caught() {
        let (mut h, _) = good();
        h.insert("e", false, &item(EPOCH + 2, 400, "+05:30", 5));
        expect(
            &check(&h.0, &BTreeMap::new()),
            "TimeZone set by another write leaked",
        );
        let (mut h, _) = good();
        h.insert("e", true, &item(EPOCH + 2, 400, "+00", 5));
        expect(
            &check(&h.0, &BTreeMap::new()),
            "SET LOCAL TimeZone had no effect",
        );
        let (mut h, _) = good();
        h.op(
            "path",
            "ok",
            json!({"k": "r", "alt": false}),
            json!({"k": "r", "alt": false, "place": "mix_alt"}),
        );
        expect(
            &check(&h.0, &BTreeMap::new()),
            "search_path set by another write leaked",
        );
    }

    #[test]
    fn foreign_key_outcomes_are_checked() {
        let (mut h, c) = good();
        let v = json!({"parent": 30, "child": 31, "bad_child": 32, "missing_parent": -32});
        h.op("orphan", "ok", v.clone(), v);
        expect(
            &check(&h.0, &finals(&c)),
            "violating a deferred foreign key was acknowledged",
        );
        let (mut h, c) = good();
        let v = json!({"parent": 30, "child": 31, "bad_child": 32, "missing_parent": -32});
        let mut f = v.clone();
        f["sqlstate"] = json!("40001");
        h.op("orphan", "fail", v, f);
        expect(&check(&h.0, &finals(&c)), "another SQLSTATE than 23503");
        let (mut h, c) = good();
        let v = json!({"parent": 40, "child": 41});
        let mut f = v.clone();
        f["sqlstate"] = json!("23503");
        h.op("family", "fail", v.clone(), f);
        expect(&check(&h.0, &finals(&c)), "valid deferred-FK write");
        // A refusal (queue full) is no result.
        let (mut h, c) = good();
        let mut f = v.clone();
        f["sqlstate"] = json!("53300");
        h.op("family", "fail", v, f);
        assert!(check(&h.0, &finals(&c)).is_empty());
        let (h, mut c) = good();
        c.parents.insert(20);
        c.children.insert(21, 20);
        expect(&check(&h.0, &finals(&c)), "rows of a write violating");
        let (h, mut c) = good();
        c.children.insert(99, 98);
        expect(&check(&h.0, &finals(&c)), "child without its parent");
        let (h, mut c) = good();
        c.parents.clear();
        expect(
            &check(&h.0, &finals(&c)),
            "family write (child before parent) incomplete",
        );
    }

    #[test]
    fn sequence_restarts_are_followed() {
        // An id from before the restart, after the restart was acknowledged.
        let (mut h, _) = good();
        h.insert("e", false, &item(5, 400, "+00", 5));
        expect(&check(&h.0, &BTreeMap::new()), "from before every restart");
        // The restart's own insert did not get the restart value.
        let mut h = H::default();
        h.restart("c", 1, &item(7, 200, "+00", 3));
        expect(
            &check(&h.0, &BTreeMap::new()),
            "did not get the restart value",
        );
        // An epoch ended by a later acknowledged restart.
        let (mut h, _) = good();
        h.restart("e", 2, &item(2 * EPOCH, 400, "+00", 5));
        h.insert("f", false, &item(EPOCH + 2, 500, "+00", 6));
        expect(
            &check(&h.0, &BTreeMap::new()),
            "a later acknowledged restart had ended",
        );
        // Ids that go down within an epoch; an epoch no restart made.
        let (mut h, _) = good();
        h.insert("e", false, &item(EPOCH, 400, "+00", 5));
        expect(&check(&h.0, &BTreeMap::new()), "serial id did not grow");
        let (mut h, _) = good();
        h.insert("e", false, &item(7 * EPOCH, 400, "+00", 5));
        expect(&check(&h.0, &BTreeMap::new()), "serial id from no restart");
    }

    #[test]
    fn defaults_and_copies_are_checked() {
        let (mut h, _) = good();
        h.insert("e", false, &item(EPOCH + 2, 50, "+00", 5));
        expect(&check(&h.0, &BTreeMap::new()), "timestamp went backwards");
        let (mut h, _) = good();
        h.insert("e", false, &item(EPOCH + 2, 400, "+00", 1));
        expect(&check(&h.0, &BTreeMap::new()), "same gen_random_uuid()");
        let (mut h, _) = good();
        let mut bad = item(EPOCH + 2, 400, "+00", 5);
        bad.r = "1.5".into();
        bad.u = "not-a-uuid".into();
        h.insert("e", false, &bad);
        let lines = check(&h.0, &BTreeMap::new());
        expect(&lines, "random() out of [0, 1)");
        expect(&lines, "not a v4 UUID");

        let (h, mut c) = good();
        c.items.remove("b");
        expect(&check(&h.0, &finals(&c)), "acknowledged insert missing");
        let (h, mut c) = good();
        c.items.get_mut("a").unwrap().r = "0.25".into();
        expect(
            &check(&h.0, &finals(&c)),
            "differs from what its acknowledgement returned",
        );
        let (h, mut c) = good();
        c.items.insert("zz".into(), item(9, 1, "+00", 9));
        expect(&check(&h.0, &finals(&c)), "never sent");
        let (h, mut c) = good();
        c.places.insert("q".into(), "mix_alt".into());
        expect(
            &check(&h.0, &finals(&c)),
            "another schema than acknowledged",
        );
        let (h, c) = good();
        let mut other = c.clone();
        other.places.insert("q".into(), "mix_alt".into());
        let f = BTreeMap::from([(1, c), (2, other)]);
        expect(&check(&h.0, &f), "nodes diverge");
    }

    #[test]
    fn a_read_that_misses_an_acknowledged_insert_is_caught() {
        let (mut h, _) = good();
        h.op(
            "read",
            "ok",
            json!({"k": "d", "id": EPOCH + 1}),
            json!({"k": "d", "id": EPOCH + 1, "seen": null}),
        );
        expect(&check(&h.0, &BTreeMap::new()), "LINEARIZABLE read missed");
    }

    #[test]
    fn uuids_are_recognized() {
        assert!(is_v4_uuid("7ff11ba6-1e2b-47f3-b7b6-3a97360a2fae"));
        assert!(!is_v4_uuid("7ff11ba6-1e2b-17f3-b7b6-3a97360a2fae"));
        assert!(!is_v4_uuid("7ff11ba6-1e2b-47f3-c7b6-3a97360a2fae"));
    }
}
