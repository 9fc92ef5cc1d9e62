//! Elle-style checker for the *list-append* workload, checking **strict serializability**
//! (after Kingsbury & Alvaro, "Elle: Inferring Isolation Anomalies from Experimental
//! Observations", VLDB 2020).
//!
//! This module owns only the checking: it reads a recorded history (see `history.rs`) and returns
//! one human-readable line per anomaly. It does not generate or run the workload.
//!
//! # Model
//!
//! Ops with `f = "txn"` are transactions; all other ops are ignored. A transaction's value is a
//! JSON array of micro-ops, `["append", k, v]` or `["r", k, null]` at `invoke`; at `ok` the reads
//! are filled in with the whole list of key `k` as the transaction saw it (`[]` or `null` when the
//! key has no list yet). Keys and values are integers and every `(k, v)` is appended at most once.
//! Each process has at most one outstanding transaction: `invoke`, then its `ok` (committed),
//! `fail` (definitely not committed) or `info` (unknown). A transaction without a completion is
//! treated as `info`. The history is in real-time order, and real time is taken from that order
//! (the position of each event in the history).
//!
//! Because lists only grow by appends, every read of a key is a prefix of the key's *version
//! order* (the final list); the longest read of a key gives the known part of that order.
//! The *committed* transactions are the `ok` ones plus the `info` ones whose appends some `ok`
//! read observed (those have an unknown completion time, i.e. +infinity). Reads of `info`
//! transactions are unknown and are not used. Over the committed transactions the checker builds a
//! dependency graph with edges
//! - **ww** `T1 -> T2`: on some key, T2 appended the next version after T1's append (also from the
//!   last observed writer to committed appends never observed, which must come later);
//! - **wr** `T1 -> T2`: T2's read of a key ended with a value T1 appended;
//! - **rw** `T1 -> T2` (anti-dependency): T1's read of a key stopped before the version T2 appended
//!   (the next one in the version order, or any committed append never observed when T1 read the
//!   longest known list);
//! - **rt** `T1 -> T2` (real time): T1 completed before T2 was invoked (only to the "frontier" of
//!   latest-completed transactions, which keeps the edge count near-linear).
//!
//! A read is used through its *external* part: the list minus the transaction's own earlier
//! appends to that key, which must sit at its end. Strict serializability holds only if this
//! graph is acyclic; each strongly connected component (iterative Tarjan) is reported with one
//! concrete cycle (breadth-first search), preferring the weakest class.
//!
//! # Anomalies (the first word of each line)
//!
//! - `malformed`: a history event or micro-op of the wrong shape, or a completion without invoke.
//! - `duplicate-append`: the same `(k, v)` appended twice (the workload promises it never is).
//! - `duplicate-elements`: a read list holding the same value twice.
//! - `garbage-read`: a read holding a value that no transaction ever tried to append.
//! - `G1a` (aborted read): a read holding a value appended by a transaction that `fail`ed.
//! - `G1b` (intermediate read): a read ending at a value that its writer followed with another
//!   append to the same key (it saw a transaction's intermediate state).
//! - `internal`: within one transaction, a read disagrees with its earlier reads and own appends
//!   (e.g. a read after its own append does not end with that append).
//! - `incompatible-order`: two reads of a key that are not prefixes of one another, so no single
//!   version order explains them.
//! - `G0` (write cycle): a cycle of ww edges only.
//! - `G1c` (circular information flow): a cycle of ww and wr edges.
//! - `G-single` (read skew, lost update): a cycle with exactly one rw edge.
//! - `G2` (write skew and other anti-dependency cycles): a cycle with several rw edges.
//! - `strict-1SR realtime cycle`: a cycle that needs a real-time edge (e.g. a stale read); the
//!   line names the class of its other edges (`G0-realtime`, `G1c-realtime`,
//!   `G-single-realtime`, `G2-realtime`).
//!
//! Transactions are shown as `p<process>#<index>`, where the index is the position of the
//! transaction's `invoke` in the history, followed by its micro-ops (reads as seen at `ok`, `?`
//! when unknown). Lines are kept under ~300 characters; at most 5 lines per anomaly name and 20 in
//! all are returned, followed by a `... and N more` line when some were left out.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::Value;

use crate::history::Op;

/// At most this many lines in all (plus one "... and N more" line).
const MAX_LINES: usize = 20;
/// At most this many lines per anomaly name.
const MAX_PER_NAME: usize = 5;
/// Lines are truncated to this many characters.
const MAX_LINE_CHARS: usize = 300;
/// At most this many rw edges per key from readers of the longest list to unobserved appends.
const MAX_UNOBSERVED_EDGES_PER_KEY: usize = 100_000;
/// At most this many rw edges tried per component when looking for a G-single cycle.
const G_SINGLE_TRIES: usize = 64;

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;
const ALL: u8 = WW | WR | RW | RT;
/// Edge kinds in order of preference when one pair has several.
const KINDS: [u8; 4] = [WW, WR, RW, RT];

/// One micro-op. A read's list is `None` when unknown (not an `ok` transaction).
#[derive(Clone, Debug, PartialEq)]
enum Mop {
    Append(i64, i64),
    Read(i64, Option<Vec<i64>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    Fail,
    Info,
}

/// One transaction: an invoke and its completion.
struct Txn {
    process: u64,
    /// Position of the `invoke` in the history (also its id).
    invoke_index: usize,
    /// Position of the `ok`, for committed-and-acknowledged transactions.
    complete_index: Option<usize>,
    status: Status,
    mops: Vec<Mop>,
    /// Whether the invoke's value parsed.
    invoke_parsed: bool,
}

/// A read by an `ok` transaction.
struct ReadObs {
    txn: usize,
    mop: usize,
    key: i64,
    /// Length of the external part (the list minus the txn's own appends at its end); `None`
    /// when the read is unusable (duplicates or internally inconsistent).
    ext_len: Option<usize>,
    /// Whether the read is a prefix of the key's longest read.
    compatible: bool,
}

/// Who appended what.
struct AppendIndex {
    /// `(k, v)` -> the (first) transaction that appended it.
    writer: HashMap<(i64, i64), usize>,
    /// `(txn, k)` -> the last value that transaction appended to k.
    last_append: HashMap<(usize, i64), i64>,
}

/// Kinds of the edges between one ordered pair, with one example key per kind.
#[derive(Clone, Copy, Default)]
struct EdgeInfo {
    mask: u8,
    keys: [Option<i64>; 4],
}

/// The dependency graph over committed transactions.
struct Graph {
    /// Node -> transaction.
    txn_of: Vec<usize>,
    adj: Vec<Vec<usize>>,
    edges: HashMap<(usize, usize), EdgeInfo>,
}

/// Anomalies found so far, by name.
#[derive(Default)]
struct Anomalies {
    items: Vec<(&'static str, String)>,
}

impl Anomalies {
    fn push(&mut self, name: &'static str, detail: String) {
        self.items.push((name, detail));
    }

    /// The capped, truncated output lines.
    fn into_lines(self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut shown_per_name: HashMap<&'static str, usize> = HashMap::new();
        let mut hidden: Vec<(&'static str, usize)> = Vec::new();
        for (name, detail) in self.items {
            let shown = shown_per_name.entry(name).or_default();
            if *shown < MAX_PER_NAME && lines.len() < MAX_LINES {
                *shown += 1;
                lines.push(truncate(&format!("{name}: {detail}"), MAX_LINE_CHARS));
            } else if let Some(h) = hidden.iter_mut().find(|h| h.0 == name) {
                h.1 += 1;
            } else {
                hidden.push((name, 1));
            }
        }
        if !hidden.is_empty() {
            let total: usize = hidden.iter().map(|h| h.1).sum();
            let parts: Vec<String> = hidden.iter().map(|(n, c)| format!("{n} x{c}")).collect();
            lines.push(truncate(
                &format!("... and {total} more ({})", parts.join(", ")),
                MAX_LINE_CHARS,
            ));
        }
        lines
    }
}

/// Checks a list-append history for strict serializability; returns one line per anomaly (empty
/// when none was found).
pub fn check(history: &[Op]) -> Vec<String> {
    let mut an = Anomalies::default();
    let txns = collect_txns(history, &mut an);
    let idx = index_appends(&txns, &mut an);
    let committed = committed_txns(&txns, &idx, &mut an);
    let mut reads = internal_checks(&txns, &idx, &mut an);
    let orders = version_orders(&txns, &mut reads, &mut an);
    intermediate_reads(&txns, &reads, &idx, &mut an);
    let graph = build_graph(&txns, &reads, &orders, &idx, &committed);
    report_cycles(&txns, &graph, &mut an);
    an.into_lines()
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Pairs invocations with completions and parses their micro-ops.
fn collect_txns(history: &[Op], an: &mut Anomalies) -> Vec<Txn> {
    let mut txns: Vec<Txn> = Vec::new();
    let mut pending: HashMap<u64, usize> = HashMap::new();
    for (i, op) in history.iter().enumerate() {
        if op.f != "txn" {
            continue;
        }
        match op.kind.as_str() {
            "invoke" => {
                let (mops, invoke_parsed) = match parse_mops(&op.value, false) {
                    Ok(m) => (m, true),
                    Err(e) => {
                        an.push("malformed", format!("p{}#{i} invoke: {e}", op.process));
                        (Vec::new(), false)
                    }
                };
                if let Some(prev) = pending.insert(op.process, txns.len()) {
                    an.push(
                        "malformed",
                        format!(
                            "process {} invoked again (history op {i}) while {} was pending; \
                             treating that one as info",
                            op.process,
                            txn_id(&txns[prev])
                        ),
                    );
                }
                txns.push(Txn {
                    process: op.process,
                    invoke_index: i,
                    complete_index: None,
                    status: Status::Info,
                    mops,
                    invoke_parsed,
                });
            }
            "ok" | "fail" | "info" => {
                let Some(t) = pending.remove(&op.process) else {
                    an.push(
                        "malformed",
                        format!(
                            "history op {i}: {} by process {} without a pending invoke",
                            op.kind, op.process
                        ),
                    );
                    continue;
                };
                let txn = &mut txns[t];
                match op.kind.as_str() {
                    "fail" => txn.status = Status::Fail,
                    "info" => {}
                    _ => match parse_mops(&op.value, true) {
                        Ok(m) => {
                            if txn.invoke_parsed && !same_shape(&txn.mops, &m) {
                                an.push(
                                    "malformed",
                                    format!(
                                        "{}: ok value {} does not match its invocation",
                                        txn_id(txn),
                                        short_json(&op.value)
                                    ),
                                );
                            }
                            txn.mops = m;
                            txn.status = Status::Ok;
                            txn.complete_index = Some(i);
                        }
                        Err(e) => an.push(
                            "malformed",
                            format!("{} ok: {e}; treating it as info", txn_id(txn)),
                        ),
                    },
                }
            }
            other => an.push(
                "malformed",
                format!("history op {i}: unknown type {:?}", truncate(other, 20)),
            ),
        }
    }
    txns
}

/// Parses a txn value. Reads get their lists only `with_reads` (at `ok`).
fn parse_mops(v: &Value, with_reads: bool) -> Result<Vec<Mop>, String> {
    let arr = v
        .as_array()
        .ok_or_else(|| format!("txn value is not an array: {}", short_json(v)))?;
    arr.iter().map(|m| parse_mop(m, with_reads)).collect()
}

fn parse_mop(m: &Value, with_reads: bool) -> Result<Mop, String> {
    let bad = |why: &str| format!("{why}: {}", short_json(m));
    let Some(a) = m.as_array() else {
        return Err(bad("micro-op is not an array"));
    };
    if a.len() != 3 {
        return Err(bad("micro-op does not have 3 elements"));
    }
    let Some(k) = a[1].as_i64() else {
        return Err(bad("key is not an integer"));
    };
    match a[0].as_str() {
        Some("append") => match a[2].as_i64() {
            Some(v) => Ok(Mop::Append(k, v)),
            None => Err(bad("appended value is not an integer")),
        },
        Some("r") if !with_reads => Ok(Mop::Read(k, None)),
        Some("r") => match &a[2] {
            Value::Null => Ok(Mop::Read(k, Some(Vec::new()))),
            Value::Array(xs) => match xs.iter().map(Value::as_i64).collect::<Option<Vec<_>>>() {
                Some(l) => Ok(Mop::Read(k, Some(l))),
                None => Err(bad("read list holds a non-integer")),
            },
            _ => Err(bad("read result is neither a list nor null")),
        },
        _ => Err(bad("unknown micro-op function")),
    }
}

/// Whether the completion's micro-ops are the invocation's (reads may differ in their lists).
fn same_shape(a: &[Mop], b: &[Mop]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Mop::Append(k1, v1), Mop::Append(k2, v2)) => k1 == k2 && v1 == v2,
            (Mop::Read(k1, _), Mop::Read(k2, _)) => k1 == k2,
            _ => false,
        })
}

// ---------------------------------------------------------------------------------------------
// Per-value and per-transaction checks

fn index_appends(txns: &[Txn], an: &mut Anomalies) -> AppendIndex {
    let mut writer: HashMap<(i64, i64), usize> = HashMap::new();
    let mut last_append = HashMap::new();
    for (t, txn) in txns.iter().enumerate() {
        for m in &txn.mops {
            if let Mop::Append(k, v) = *m {
                match writer.entry((k, v)) {
                    Entry::Occupied(e) => an.push(
                        "duplicate-append",
                        format!(
                            "key {k} value {v} appended by both {} and {}",
                            txn_id(&txns[*e.get()]),
                            txn_id(txn)
                        ),
                    ),
                    Entry::Vacant(e) => {
                        e.insert(t);
                    }
                }
                last_append.insert((t, k), v);
            }
        }
    }
    AppendIndex {
        writer,
        last_append,
    }
}

/// Which transactions committed (ok, or info with an observed append); reports reads of failed
/// (G1a) or never-appended (garbage) values.
fn committed_txns(txns: &[Txn], idx: &AppendIndex, an: &mut Anomalies) -> Vec<bool> {
    let mut committed: Vec<bool> = txns.iter().map(|t| t.status == Status::Ok).collect();
    // (k, v) -> (first reader, number of reads)
    let mut bad: BTreeMap<(i64, i64), (usize, usize)> = BTreeMap::new();
    for (r, txn) in txns.iter().enumerate() {
        if txn.status != Status::Ok {
            continue;
        }
        for m in &txn.mops {
            let Mop::Read(k, Some(l)) = m else { continue };
            for &v in l {
                match idx.writer.get(&(*k, v)) {
                    Some(&w) if txns[w].status == Status::Info => committed[w] = true,
                    Some(&w) if txns[w].status == Status::Ok => {}
                    _ => bad.entry((*k, v)).or_insert((r, 0)).1 += 1,
                }
            }
        }
    }
    for ((k, v), (r, n)) in bad {
        let others = if n > 1 {
            format!(" (and {} other reads)", n - 1)
        } else {
            String::new()
        };
        match idx.writer.get(&(k, v)) {
            Some(&w) => an.push(
                "G1a",
                format!(
                    "key {k} value {v} appended by failed txn {} was read by {}{others}",
                    fmt_txn(&txns[w], 80),
                    fmt_txn(&txns[r], 120)
                ),
            ),
            None => an.push(
                "garbage-read",
                format!(
                    "key {k} value {v} was never appended, yet read by {}{others}",
                    fmt_txn(&txns[r], 160)
                ),
            ),
        }
    }
    committed
}

/// Duplicate elements and internal consistency of every ok read; returns the reads.
fn internal_checks(txns: &[Txn], idx: &AppendIndex, an: &mut Anomalies) -> Vec<ReadObs> {
    let mut reads = Vec::new();
    for (t, txn) in txns.iter().enumerate() {
        if txn.status != Status::Ok {
            continue;
        }
        // What each key must read next, once it has been read in this txn.
        let mut expected: HashMap<i64, Vec<i64>> = HashMap::new();
        // This txn's appends so far, per key.
        let mut own: HashMap<i64, Vec<i64>> = HashMap::new();
        for (mi, m) in txn.mops.iter().enumerate() {
            match m {
                Mop::Append(k, v) => {
                    own.entry(*k).or_default().push(*v);
                    if let Some(e) = expected.get_mut(k) {
                        e.push(*v);
                    }
                }
                Mop::Read(_, None) => {}
                Mop::Read(k, Some(l)) => {
                    let k = *k;
                    let mut seen = HashSet::with_capacity(l.len());
                    let ext_len = if let Some(d) = l.iter().find(|v| !seen.insert(**v)) {
                        an.push(
                            "duplicate-elements",
                            format!(
                                "{} read key {k} = {}, which holds {d} more than once",
                                fmt_txn(txn, 120),
                                fmt_list(l)
                            ),
                        );
                        None
                    } else {
                        let own_k: &[i64] = own.get(&k).map(Vec::as_slice).unwrap_or(&[]);
                        let self_count = l
                            .iter()
                            .filter(|v| idx.writer.get(&(k, **v)) == Some(&t))
                            .count();
                        let problem = if self_count != own_k.len() {
                            Some(format!(
                                "read key {k} = {}, which holds {self_count} of its own appends, \
                                 but it had made {} ({}) by then",
                                fmt_list(l),
                                own_k.len(),
                                fmt_list(own_k)
                            ))
                        } else if !l.ends_with(own_k) {
                            Some(format!(
                                "read key {k} = {}, which should end with its own appends {}",
                                fmt_list(l),
                                fmt_list(own_k)
                            ))
                        } else {
                            expected.get(&k).filter(|e| *e != l).map(|e| {
                                format!(
                                    "read key {k} = {}, but its earlier read and appends imply {}",
                                    fmt_list(l),
                                    fmt_list(e)
                                )
                            })
                        };
                        match problem {
                            Some(p) => {
                                an.push("internal", format!("{}: {p}", fmt_txn(txn, 120)));
                                None
                            }
                            None => Some(l.len() - own_k.len()),
                        }
                    };
                    reads.push(ReadObs {
                        txn: t,
                        mop: mi,
                        key: k,
                        ext_len,
                        compatible: false,
                    });
                    expected.insert(k, l.clone());
                }
            }
        }
    }
    reads
}

fn read_list<'a>(txns: &'a [Txn], r: &ReadObs) -> &'a [i64] {
    match txns[r.txn].mops.get(r.mop) {
        Some(Mop::Read(_, Some(l))) => l,
        _ => &[],
    }
}

/// The known version order of each key (its longest usable read); marks which reads are prefixes
/// of it and reports those that are not.
fn version_orders(
    txns: &[Txn],
    reads: &mut [ReadObs],
    an: &mut Anomalies,
) -> BTreeMap<i64, Vec<i64>> {
    let mut longest: BTreeMap<i64, usize> = BTreeMap::new();
    for (ri, r) in reads.iter().enumerate() {
        if r.ext_len.is_none() {
            continue;
        }
        let len = read_list(txns, r).len();
        match longest.get(&r.key) {
            Some(&b) if read_list(txns, &reads[b]).len() >= len => {}
            _ => {
                longest.insert(r.key, ri);
            }
        }
    }
    // key -> (first incompatible read, count)
    let mut incompatible: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
    for ri in 0..reads.len() {
        if reads[ri].ext_len.is_none() {
            continue;
        }
        let key = reads[ri].key;
        let Some(&b) = longest.get(&key) else {
            continue;
        };
        let l = read_list(txns, &reads[ri]);
        let ok = read_list(txns, &reads[b]).starts_with(l);
        reads[ri].compatible = ok;
        if !ok {
            incompatible.entry(key).or_insert((ri, 0)).1 += 1;
        }
    }
    for (key, (ri, n)) in incompatible {
        let (r, b) = (&reads[ri], &reads[longest[&key]]);
        an.push(
            "incompatible-order",
            format!(
                "key {key}: {} read {} but {} read {}, not an extension of it ({n} such reads)",
                txn_id(&txns[r.txn]),
                fmt_list(read_list(txns, r)),
                txn_id(&txns[b.txn]),
                fmt_list(read_list(txns, b))
            ),
        );
    }
    longest
        .into_iter()
        .map(|(k, ri)| (k, read_list(txns, &reads[ri]).to_vec()))
        .collect()
}

/// G1b: a read whose external part ends at a non-final append of another transaction.
fn intermediate_reads(txns: &[Txn], reads: &[ReadObs], idx: &AppendIndex, an: &mut Anomalies) {
    for r in reads {
        let Some(e) = r.ext_len.filter(|&e| e > 0) else {
            continue;
        };
        let l = read_list(txns, r);
        let v = l[e - 1];
        let Some(&w) = idx.writer.get(&(r.key, v)) else {
            continue;
        };
        if w == r.txn || txns[w].status == Status::Fail {
            continue;
        }
        if let Some(&last) = idx.last_append.get(&(w, r.key)) {
            if last != v {
                an.push(
                    "G1b",
                    format!(
                        "{} read key {} = {}, ending at {v}, an intermediate append of {} \
                         (its final append to key {} is {last})",
                        fmt_txn(&txns[r.txn], 80),
                        r.key,
                        fmt_list(l),
                        fmt_txn(&txns[w], 80),
                        r.key
                    ),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dependency graph

struct GraphBuilder {
    node_of: Vec<Option<usize>>,
    edges: HashMap<(usize, usize), EdgeInfo>,
}

impl GraphBuilder {
    /// Adds an edge between two transactions if both are nodes and they differ.
    fn add(&mut self, from: usize, to: usize, kind: u8, key: Option<i64>) {
        if from == to {
            return;
        }
        let (Some(a), Some(b)) = (self.node_of[from], self.node_of[to]) else {
            return;
        };
        let e = self.edges.entry((a, b)).or_default();
        if e.mask & kind == 0 {
            e.mask |= kind;
            e.keys[kind_slot(kind)] = key;
        }
    }
}

fn kind_slot(kind: u8) -> usize {
    KINDS.iter().position(|&k| k == kind).unwrap_or(0)
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        WW => "ww",
        WR => "wr",
        RW => "rw",
        _ => "rt",
    }
}

fn build_graph(
    txns: &[Txn],
    reads: &[ReadObs],
    orders: &BTreeMap<i64, Vec<i64>>,
    idx: &AppendIndex,
    committed: &[bool],
) -> Graph {
    let mut txn_of = Vec::new();
    let mut node_of = vec![None; txns.len()];
    for (t, &c) in committed.iter().enumerate() {
        if c {
            node_of[t] = Some(txn_of.len());
            txn_of.push(t);
        }
    }
    let mut g = GraphBuilder {
        node_of,
        edges: HashMap::new(),
    };
    let writer = |k: i64, v: i64| idx.writer.get(&(k, v)).copied().filter(|&w| committed[w]);

    // Committed appends that no read observed: they come after each key's known order.
    let order_sets: HashMap<i64, HashSet<i64>> = orders
        .iter()
        .map(|(k, o)| (*k, o.iter().copied().collect()))
        .collect();
    let mut unobserved: HashMap<i64, Vec<usize>> = HashMap::new();
    for (t, txn) in txns.iter().enumerate() {
        if !committed[t] {
            continue;
        }
        for m in &txn.mops {
            if let Mop::Append(k, v) = *m {
                if order_sets.get(&k).is_some_and(|s| s.contains(&v)) {
                    continue;
                }
                let u = unobserved.entry(k).or_default();
                if u.last() != Some(&t) {
                    u.push(t);
                }
            }
        }
    }

    // ww edges; next_writer[k][i] = first committed writer at or after position i.
    let mut next_writer: HashMap<i64, Vec<Option<usize>>> = HashMap::new();
    for (&k, order) in orders {
        let mut prev: Option<usize> = None;
        for &v in order {
            if let Some(w) = writer(k, v) {
                if let Some(p) = prev {
                    g.add(p, w, WW, Some(k));
                }
                prev = Some(w);
            }
        }
        if let (Some(p), Some(us)) = (prev, unobserved.get(&k)) {
            for &u in us {
                g.add(p, u, WW, Some(k));
            }
        }
        let mut nw = vec![None; order.len() + 1];
        for i in (0..order.len()).rev() {
            nw[i] = writer(k, order[i]).or(nw[i + 1]);
        }
        next_writer.insert(k, nw);
    }

    // wr and rw edges.
    let mut unobserved_edges: HashMap<i64, usize> = HashMap::new();
    for r in reads {
        let Some(e) = r.ext_len else { continue };
        let l = read_list(txns, r);
        let k = r.key;
        if e > 0 {
            if let Some(w) = writer(k, l[e - 1]) {
                g.add(w, r.txn, WR, Some(k));
            }
        }
        if !r.compatible {
            continue;
        }
        let order_len = orders.get(&k).map_or(0, Vec::len);
        if e < order_len {
            if let Some(w) = next_writer.get(&k).and_then(|nw| nw[e]) {
                g.add(r.txn, w, RW, Some(k));
            }
        } else if let Some(us) = unobserved.get(&k) {
            let count = unobserved_edges.entry(k).or_default();
            for &u in us {
                if *count >= MAX_UNOBSERVED_EDGES_PER_KEY {
                    break;
                }
                *count += 1;
                g.add(r.txn, u, RW, Some(k));
            }
        }
    }

    // Real-time edges, from the frontier: completed txns not real-time-before another completed
    // one. History positions are real time.
    let mut events: Vec<(usize, bool, usize)> = Vec::new();
    for (t, txn) in txns.iter().enumerate() {
        if committed[t] {
            events.push((txn.invoke_index, false, t));
            if let Some(c) = txn.complete_index {
                events.push((c, true, t));
            }
        }
    }
    events.sort_unstable();
    let mut frontier: Vec<usize> = Vec::new();
    let mut preds: HashMap<usize, Vec<usize>> = HashMap::new();
    for (_, completion, t) in events {
        if completion {
            let p = preds.remove(&t).unwrap_or_default();
            frontier.retain(|x| !p.contains(x));
            frontier.push(t);
        } else {
            for &p in &frontier {
                g.add(p, t, RT, None);
            }
            if txns[t].complete_index.is_some() {
                preds.insert(t, frontier.clone());
            }
        }
    }

    let mut adj = vec![Vec::new(); txn_of.len()];
    for &(a, b) in g.edges.keys() {
        adj[a].push(b);
    }
    for a in &mut adj {
        a.sort_unstable();
    }
    Graph {
        txn_of,
        adj,
        edges: g.edges,
    }
}

/// Strongly connected components, iteratively (Tarjan).
fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = adj.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut call: Vec<(usize, usize)> = Vec::new();
    let mut next = 0;
    let mut sccs = Vec::new();
    for s in 0..n {
        if index[s] != usize::MAX {
            continue;
        }
        index[s] = next;
        low[s] = next;
        next += 1;
        stack.push(s);
        on_stack[s] = true;
        call.push((s, 0));
        while let Some(frame) = call.last_mut() {
            let v = frame.0;
            if let Some(&w) = adj[v].get(frame.1) {
                frame.1 += 1;
                if index[w] == usize::MAX {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
            } else {
                call.pop();
                if let Some(&(u, _)) = call.last() {
                    low[u] = low[u].min(low[v]);
                }
                if low[v] == index[v] {
                    let mut scc = Vec::new();
                    while let Some(w) = stack.pop() {
                        on_stack[w] = false;
                        scc.push(w);
                        if w == v {
                            break;
                        }
                    }
                    sccs.push(scc);
                }
            }
        }
    }
    sccs
}

/// Shortest path `from ... to` (inclusive; `from == to` finds a cycle through it).
fn bfs_path(adj: &[Vec<usize>], from: usize, to: usize) -> Option<Vec<usize>> {
    let mut parent = vec![usize::MAX; adj.len()];
    let mut queue = VecDeque::from([from]);
    parent[from] = from;
    while let Some(u) = queue.pop_front() {
        for &w in &adj[u] {
            if w == to {
                let mut path = vec![to];
                let mut x = u;
                loop {
                    path.push(x);
                    if x == from {
                        break;
                    }
                    x = parent[x];
                }
                path.reverse();
                return Some(path);
            }
            if parent[w] == usize::MAX {
                parent[w] = u;
                queue.push_back(w);
            }
        }
    }
    None
}

/// A component's nodes renumbered locally, with the edges of the given kinds among them.
fn local_graph(scc: &[usize], g: &Graph, mask: u8) -> Vec<Vec<usize>> {
    let local: HashMap<usize, usize> = scc.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    scc.iter()
        .map(|&v| {
            g.adj[v]
                .iter()
                .filter(|&&w| g.edges.get(&(v, w)).is_some_and(|e| e.mask & mask != 0))
                .filter_map(|w| local.get(w).copied())
                .collect()
        })
        .collect()
}

/// A short cycle inside the component using only edges of the given kinds, as nodes
/// `c0 -> c1 -> ... -> c0`.
fn find_cycle(scc: &[usize], g: &Graph, mask: u8) -> Option<Vec<usize>> {
    let adj = local_graph(scc, g, mask);
    let sub = tarjan(&adj);
    let start = sub.iter().find(|c| c.len() > 1)?[0];
    let mut path = bfs_path(&adj, start, start)?;
    path.pop();
    Some(path.into_iter().map(|i| scc[i]).collect())
}

/// A cycle with exactly one rw edge (plus ww/wr edges), trying a bounded number of rw edges.
fn find_g_single(scc: &[usize], g: &Graph) -> Option<Vec<usize>> {
    let adj = local_graph(scc, g, WW | WR);
    let local: HashMap<usize, usize> = scc.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let mut tries = 0;
    for (ia, &a) in scc.iter().enumerate() {
        for &b in &g.adj[a] {
            let Some(&ib) = local.get(&b) else { continue };
            if g.edges.get(&(a, b)).is_none_or(|e| e.mask & RW == 0) {
                continue;
            }
            tries += 1;
            if tries > G_SINGLE_TRIES {
                return None;
            }
            if let Some(path) = bfs_path(&adj, ib, ia) {
                let mut cycle = vec![a];
                cycle.extend(path[..path.len() - 1].iter().map(|&i| scc[i]));
                return Some(cycle);
            }
        }
    }
    None
}

/// The kind shown for each edge of a cycle (the preferred one among the allowed kinds).
fn label(cycle: &[usize], g: &Graph, mask: u8) -> Vec<u8> {
    (0..cycle.len())
        .map(|i| {
            let e = g.edges.get(&(cycle[i], cycle[(i + 1) % cycle.len()]));
            let m = e.map_or(0, |e| e.mask) & mask;
            KINDS.iter().copied().find(|&k| m & k != 0).unwrap_or(RT)
        })
        .collect()
}

fn fmt_cycle(cycle: &[usize], kinds: &[u8], g: &Graph, txns: &[Txn], scc_len: usize) -> String {
    // Room for each txn's micro-ops so that the line stays near MAX_LINE_CHARS; none when the
    // cycle is long (then only the ids are shown).
    let n = cycle.len().max(1);
    let per_txn = 240usize.saturating_sub(30 * n) / n;
    let mut s = format!("{}-txn cycle", cycle.len());
    if scc_len > cycle.len() {
        s.push_str(&format!(" (in a component of {scc_len} txns)"));
    }
    s.push_str(": ");
    for (i, (&v, &kind)) in cycle.iter().zip(kinds).enumerate() {
        let w = cycle[(i + 1) % cycle.len()];
        let t = &txns[g.txn_of[v]];
        if per_txn >= 12 {
            s.push_str(&fmt_txn(t, per_txn));
        } else {
            s.push_str(&txn_id(t));
        }
        let key = g.edges.get(&(v, w)).and_then(|e| e.keys[kind_slot(kind)]);
        match key {
            Some(k) => s.push_str(&format!(" -{} k{k}-> ", kind_name(kind))),
            None => s.push_str(&format!(" -{}-> ", kind_name(kind))),
        }
    }
    if let Some(&first) = cycle.first() {
        s.push_str(&txn_id(&txns[g.txn_of[first]]));
    }
    s
}

/// Reports one cycle per nontrivial strongly connected component, classified.
fn report_cycles(txns: &[Txn], g: &Graph, an: &mut Anomalies) {
    let mut sccs: Vec<Vec<usize>> = tarjan(&g.adj).into_iter().filter(|c| c.len() > 1).collect();
    // In history order (nodes are numbered in invocation order).
    for c in &mut sccs {
        c.sort_unstable();
    }
    sccs.sort_unstable_by_key(|c| c[0]);
    for scc in &sccs {
        let (name, detail) = explain_scc(scc, g, txns);
        an.push(name, detail);
    }
}

fn explain_scc(scc: &[usize], g: &Graph, txns: &[Txn]) -> (&'static str, String) {
    let show = |c: &[usize], mask: u8| fmt_cycle(c, &label(c, g, mask), g, txns, scc.len());
    if let Some(c) = find_cycle(scc, g, WW) {
        return ("G0", show(&c, WW));
    }
    if let Some(c) = find_cycle(scc, g, WW | WR) {
        return ("G1c", show(&c, WW | WR));
    }
    if let Some(c) = find_cycle(scc, g, WW | WR | RW) {
        let rws = label(&c, g, WW | WR | RW)
            .iter()
            .filter(|&&k| k == RW)
            .count();
        if rws == 1 {
            return ("G-single", show(&c, WW | WR | RW));
        }
        if let Some(c1) = find_g_single(scc, g) {
            return ("G-single", show(&c1, WW | WR | RW));
        }
        return ("G2", show(&c, WW | WR | RW));
    }
    let name = "strict-1SR realtime cycle";
    let Some(c) = find_cycle(scc, g, ALL) else {
        return (
            name,
            format!("component of {} txns without a found cycle", scc.len()),
        );
    };
    let kinds = label(&c, g, ALL);
    let rws = kinds.iter().filter(|&&k| k == RW).count();
    let class = if rws > 1 {
        "G2-realtime"
    } else if rws == 1 {
        "G-single-realtime"
    } else if kinds.contains(&WR) {
        "G1c-realtime"
    } else {
        "G0-realtime"
    };
    (
        name,
        format!("{class}, {}", fmt_cycle(&c, &kinds, g, txns, scc.len())),
    )
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

fn short_json(v: &Value) -> String {
    truncate(&v.to_string(), 60)
}

fn txn_id(t: &Txn) -> String {
    format!("p{}#{}", t.process, t.invoke_index)
}

fn fmt_list(l: &[i64]) -> String {
    let join = |xs: &[i64]| xs.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    if l.len() <= 8 {
        format!("[{}]", join(l))
    } else {
        format!(
            "[{} ..{} more.. {}]",
            join(&l[..3]),
            l.len() - 6,
            join(&l[l.len() - 3..])
        )
    }
}

fn fmt_mop(m: &Mop) -> String {
    match m {
        Mop::Append(k, v) => format!("append {k} {v}"),
        Mop::Read(k, Some(l)) => format!("r {k} {}", fmt_list(l)),
        Mop::Read(k, None) => format!("r {k} ?"),
    }
}

/// `p<process>#<index> [micro-ops]`, the micro-ops cut to `max` characters.
fn fmt_txn(t: &Txn, max: usize) -> String {
    let ops: Vec<String> = t.mops.iter().map(fmt_mop).collect();
    format!("{} [{}]", txn_id(t), truncate(&ops.join(", "), max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    /// Builds histories; each event gets the next time.
    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
    }

    impl H {
        fn push(&mut self, kind: &str, p: u64, value: Value) -> &mut Self {
            let time = self.ops.len() as u64 * 1000;
            self.ops.push(Op {
                kind: kind.to_string(),
                process: p,
                f: "txn".to_string(),
                value,
                time,
            });
            self
        }
        fn invoke(&mut self, p: u64, v: Value) -> &mut Self {
            self.push("invoke", p, v)
        }
        fn ok(&mut self, p: u64, v: Value) -> &mut Self {
            self.push("ok", p, v)
        }
        fn fail(&mut self, p: u64, v: Value) -> &mut Self {
            self.push("fail", p, v)
        }
        fn info(&mut self, p: u64, v: Value) -> &mut Self {
            self.push("info", p, v)
        }
        /// An invocation immediately followed by its ok; the invoke has the reads nulled.
        fn txn(&mut self, p: u64, v: Value) -> &mut Self {
            self.invoke(p, invocation(&v));
            self.ok(p, v)
        }
    }

    fn invocation(v: &Value) -> Value {
        let mops = v.as_array().cloned().unwrap_or_default();
        Value::Array(
            mops.into_iter()
                .map(|m| match m.get(0).and_then(Value::as_str) {
                    Some("r") => json!(["r", m[1], null]),
                    _ => m,
                })
                .collect(),
        )
    }

    fn assert_clean(ops: &[Op]) {
        let a = check(ops);
        assert!(a.is_empty(), "unexpected anomalies: {a:#?}");
    }

    fn assert_has(ops: &[Op], name: &str) -> Vec<String> {
        let a = check(ops);
        assert!(
            a.iter().any(|l| l.starts_with(&format!("{name}:"))),
            "expected {name}, got {a:#?}"
        );
        for l in &a {
            assert!(l.chars().count() <= MAX_LINE_CHARS, "line too long: {l}");
        }
        a
    }

    #[test]
    fn elle_serial_ok() {
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1], ["r", 1, [1]]]))
            .txn(
                2,
                json!([["r", 1, [1]], ["append", 1, 2], ["append", 2, 1]]),
            )
            .txn(1, json!([["r", 1, [1, 2]], ["r", 2, [1]], ["r", 3, null]]))
            .txn(3, json!([["r", 3, []], ["append", 3, 7], ["r", 3, [7]]]));
        assert_clean(&h.ops);
    }

    #[test]
    fn elle_concurrent_serializable_ok() {
        let mut h = H::default();
        // T1 appends x=1 while T2, concurrently, reads x=[] (T2 before T1) and T3 reads x=[1].
        h.invoke(1, json!([["append", 1, 1]]))
            .invoke(2, json!([["r", 1, null], ["append", 2, 1]]))
            .invoke(3, json!([["r", 1, null]]))
            .ok(2, json!([["r", 1, []], ["append", 2, 1]]))
            .ok(3, json!([["r", 1, [1]]]))
            .ok(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, [1]], ["r", 2, [1]]]));
        assert_clean(&h.ops);
    }

    #[test]
    fn elle_info_observed_ok() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1], ["r", 2, null]]))
            .info(1, json!([["append", 1, 1], ["r", 2, null]]))
            .txn(2, json!([["r", 1, [1]]]))
            .txn(2, json!([["append", 1, 2]]))
            .txn(3, json!([["r", 1, [1, 2]]]));
        assert_clean(&h.ops);
    }

    #[test]
    fn elle_info_unobserved_ok() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1]]))
            .info(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, []]]))
            .invoke(4, json!([["append", 1, 9]])); // never completed
        h.txn(3, json!([["append", 1, 2]]))
            .txn(2, json!([["r", 1, [2]]]));
        assert_clean(&h.ops);
    }

    #[test]
    fn elle_non_txn_ops_ignored() {
        let ops = vec![Op {
            kind: "invoke".into(),
            process: 1,
            f: "add".into(),
            value: json!(3),
            time: 0,
        }];
        assert_clean(&ops);
    }

    #[test]
    fn elle_incompatible_order() {
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(1, json!([["append", 1, 2]]))
            .txn(2, json!([["r", 1, [1, 2]]]))
            .txn(3, json!([["r", 1, [2]]]));
        assert_has(&h.ops, "incompatible-order");

        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1]]))
            .invoke(2, json!([["append", 1, 2]]))
            .invoke(3, json!([["append", 1, 3]]))
            .ok(1, json!([["append", 1, 1]]))
            .ok(2, json!([["append", 1, 2]]))
            .ok(3, json!([["append", 1, 3]]))
            .txn(4, json!([["r", 1, [1, 2]]]))
            .txn(5, json!([["r", 1, [1, 3]]]));
        assert_has(&h.ops, "incompatible-order");
    }

    #[test]
    fn elle_duplicate_elements() {
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, [1, 1]]]));
        assert_has(&h.ops, "duplicate-elements");
    }

    #[test]
    fn elle_g1a_and_garbage() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1]]))
            .fail(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, [1]]]));
        assert_has(&h.ops, "G1a");

        let mut h = H::default();
        h.txn(2, json!([["r", 1, [42]]]));
        assert_has(&h.ops, "garbage-read");
    }

    #[test]
    fn elle_g1b() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1], ["append", 1, 2]]))
            .invoke(2, json!([["r", 1, null]]))
            .ok(2, json!([["r", 1, [1]]]))
            .ok(1, json!([["append", 1, 1], ["append", 1, 2]]));
        assert_has(&h.ops, "G1b");
    }

    #[test]
    fn elle_internal() {
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1], ["r", 1, []]]));
        assert_has(&h.ops, "internal");

        // Non-repeatable read within one txn.
        let mut h = H::default();
        h.txn(2, json!([["append", 1, 5]]))
            .invoke(1, json!([["r", 1, null], ["r", 1, null]]));
        h.ok(1, json!([["r", 1, []], ["r", 1, [5]]]));
        assert_has(&h.ops, "internal");
    }

    #[test]
    fn elle_g0() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1], ["append", 2, 1]]))
            .invoke(2, json!([["append", 1, 2], ["append", 2, 2]]))
            .ok(1, json!([["append", 1, 1], ["append", 2, 1]]))
            .ok(2, json!([["append", 1, 2], ["append", 2, 2]]))
            .txn(3, json!([["r", 1, [1, 2]], ["r", 2, [2, 1]]]));
        let a = assert_has(&h.ops, "G0");
        assert!(a[0].contains("-ww k"), "{a:?}");
    }

    #[test]
    fn elle_g1c() {
        let mut h = H::default();
        h.invoke(1, json!([["append", 1, 1], ["r", 2, null]]))
            .invoke(2, json!([["append", 2, 1], ["r", 1, null]]))
            .ok(1, json!([["append", 1, 1], ["r", 2, [1]]]))
            .ok(2, json!([["append", 2, 1], ["r", 1, [1]]]));
        assert_has(&h.ops, "G1c");
    }

    #[test]
    fn elle_g_single_read_skew() {
        let mut h = H::default();
        // T2 appends x=1 and y=1 atomically; T1 sees y's but not x's.
        h.invoke(1, json!([["r", 1, null], ["r", 2, null]]))
            .invoke(2, json!([["append", 1, 1], ["append", 2, 1]]))
            .ok(2, json!([["append", 1, 1], ["append", 2, 1]]))
            .ok(1, json!([["r", 1, []], ["r", 2, [1]]]))
            .txn(3, json!([["r", 1, [1]]]));
        assert_has(&h.ops, "G-single");
    }

    #[test]
    fn elle_g_single_lost_update() {
        let mut h = H::default();
        // Both read x=[] and append; the version order puts one after the other.
        h.invoke(1, json!([["r", 1, null], ["append", 1, 1]]))
            .invoke(2, json!([["r", 1, null], ["append", 1, 2]]))
            .ok(1, json!([["r", 1, []], ["append", 1, 1]]))
            .ok(2, json!([["r", 1, []], ["append", 1, 2]]))
            .txn(3, json!([["r", 1, [1, 2]]]));
        assert_has(&h.ops, "G-single");
    }

    #[test]
    fn elle_g2_write_skew() {
        let mut h = H::default();
        h.invoke(1, json!([["r", 1, null], ["r", 2, null], ["append", 1, 1]]))
            .invoke(2, json!([["r", 1, null], ["r", 2, null], ["append", 2, 1]]))
            .ok(1, json!([["r", 1, []], ["r", 2, []], ["append", 1, 1]]))
            .ok(2, json!([["r", 1, []], ["r", 2, []], ["append", 2, 1]]))
            .txn(3, json!([["r", 1, [1]], ["r", 2, [1]]]));
        let a = assert_has(&h.ops, "G2");
        assert!(!a.iter().any(|l| l.starts_with("G-single")), "{a:?}");
    }

    #[test]
    fn elle_g2_write_skew_unobserved() {
        // The same without a later read: the appends are never observed.
        let mut h = H::default();
        h.invoke(1, json!([["r", 1, null], ["r", 2, null], ["append", 1, 1]]))
            .invoke(2, json!([["r", 1, null], ["r", 2, null], ["append", 2, 1]]))
            .ok(1, json!([["r", 1, []], ["r", 2, []], ["append", 1, 1]]))
            .ok(2, json!([["r", 1, []], ["r", 2, []], ["append", 2, 1]]));
        assert_has(&h.ops, "G2");
    }

    #[test]
    fn elle_realtime_stale_read() {
        // T1 appends x=1 and completes; T2, invoked later, reads x=[].
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, []]]));
        let a = assert_has(&h.ops, "strict-1SR realtime cycle");
        assert!(a[0].contains("G-single-realtime"), "{a:?}");

        // Same, with a later read establishing the order.
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(2, json!([["r", 1, []]]))
            .txn(3, json!([["r", 1, [1]]]));
        assert_has(&h.ops, "strict-1SR realtime cycle");

        // And a ww one: T1 completes before T2 starts, yet T2's append comes first.
        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(2, json!([["append", 1, 2]]))
            .txn(3, json!([["r", 1, [2, 1]]]));
        let a = assert_has(&h.ops, "strict-1SR realtime cycle");
        assert!(a[0].contains("G0-realtime"), "{a:?}");
    }

    #[test]
    fn elle_malformed_never_panics() {
        let mut h = H::default();
        h.invoke(1, json!("nonsense"))
            .ok(1, json!({"a": 1}))
            .invoke(2, json!([["append", "x", 1], ["r"], 5, ["zap", 1, 1]]))
            .ok(2, json!(null))
            .invoke(3, json!([["r", 1, null]]))
            .ok(3, json!([["r", 1, "oops"]]))
            .invoke(4, json!([["r", 1, null]]))
            .ok(4, json!([["r", 1, [1.5, -1]]]))
            .ok(9, json!([]))
            .push("weird", 5, json!([]))
            .invoke(6, json!([["append", 1, u64::MAX]]))
            .invoke(6, json!([["append", 1, 1], ["append", 1, 1]]))
            .ok(6, json!([["append", 1, 2]]))
            .invoke(7, json!([]))
            .ok(7, json!([]));
        assert_has(&h.ops, "malformed");

        let mut h = H::default();
        h.txn(1, json!([["append", 1, 1]]))
            .txn(2, json!([["append", 1, 1], ["r", 1, [1, 1]]]));
        assert_has(&h.ops, "duplicate-append");
    }

    #[test]
    fn elle_output_is_capped() {
        let mut h = H::default();
        for i in 0..100 {
            h.txn(1, json!([["r", i, [i + 1000]]]));
        }
        let a = check(&h.ops);
        assert_eq!(a.len(), MAX_PER_NAME + 1, "{a:#?}");
        assert!(
            a.last().is_some_and(|l| l.starts_with("... and 95 more")),
            "{a:#?}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Simulated serializable database

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Clone, PartialEq)]
    enum Stage {
        Idle,
        Invoked,
        Applied,
    }

    struct Slot {
        process: u64,
        stage: Stage,
        invoke: Value,
        result: Value,
    }

    /// A serial database executing random transactions from `procs` concurrent processes; each
    /// transaction takes effect atomically at some point between its invoke and completion.
    /// Some fail (without effect) and some end as info (with or without effect).
    /// `window`: keys slide with time so that lists stay short.
    fn simulate(seed: u64, n_txns: usize, procs: u64, window: bool) -> Vec<Op> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut db: HashMap<i64, Vec<i64>> = HashMap::new();
        let mut next_value = 1i64;
        let mut h = H::default();
        let mut slots: Vec<Slot> = (0..procs)
            .map(|p| Slot {
                process: p,
                stage: Stage::Idle,
                invoke: Value::Null,
                result: Value::Null,
            })
            .collect();
        let mut started = 0;
        loop {
            if started >= n_txns && slots.iter().all(|s| s.stage == Stage::Idle) {
                break;
            }
            let s = &mut slots[rng.below(procs) as usize];
            match s.stage {
                Stage::Idle => {
                    if started >= n_txns {
                        continue;
                    }
                    let base = if window { (started / 40) as i64 } else { 0 };
                    let n = 1 + rng.below(4);
                    let mops: Vec<Value> = (0..n)
                        .map(|_| {
                            let k = base + rng.below(5) as i64;
                            if rng.below(2) == 0 {
                                next_value += 1;
                                json!(["append", k, next_value])
                            } else {
                                json!(["r", k, null])
                            }
                        })
                        .collect();
                    s.invoke = Value::Array(mops);
                    h.invoke(s.process, s.invoke.clone());
                    s.stage = Stage::Invoked;
                    started += 1;
                }
                Stage::Invoked => match rng.below(20) {
                    0 => {
                        h.fail(s.process, s.invoke.clone());
                        s.stage = Stage::Idle;
                    }
                    1 => {
                        h.info(s.process, s.invoke.clone());
                        s.process += procs;
                        s.stage = Stage::Idle;
                    }
                    _ => {
                        let mops = s.invoke.as_array().cloned().unwrap_or_default();
                        let result: Vec<Value> = mops
                            .iter()
                            .map(|m| {
                                let k = m[1].as_i64().unwrap();
                                if m[0] == "append" {
                                    db.entry(k).or_default().push(m[2].as_i64().unwrap());
                                    m.clone()
                                } else {
                                    match db.get(&k) {
                                        Some(l) => json!(["r", k, l]),
                                        None => json!(["r", k, null]),
                                    }
                                }
                            })
                            .collect();
                        s.result = Value::Array(result);
                        s.stage = Stage::Applied;
                    }
                },
                Stage::Applied => {
                    if rng.below(20) == 0 {
                        h.info(s.process, s.invoke.clone());
                        s.process += procs;
                    } else {
                        h.ok(s.process, s.result.clone());
                    }
                    s.stage = Stage::Idle;
                }
            }
        }
        h.ops
    }

    #[test]
    fn elle_random_serializable_histories_are_clean() {
        for seed in 1..=40 {
            let ops = simulate(seed, 300, 2 + seed % 6, seed % 2 == 0);
            let a = check(&ops);
            assert!(a.is_empty(), "seed {seed}: {a:#?}");
        }
    }

    #[test]
    fn elle_random_history_with_a_lost_append_is_caught() {
        // Drop one acknowledged append from every later read: version orders stay compatible,
        // but real time and the later appends contradict it.
        for seed in 1..=10 {
            let mut ops = simulate(seed, 300, 5, false);
            let victim = ops
                .iter()
                .position(|o| {
                    o.kind == "ok"
                        && o.value
                            .as_array()
                            .is_some_and(|m| m.iter().any(|m| m[0] == "append"))
                })
                .unwrap();
            let m = ops[victim]
                .value
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m[0] == "append");
            let (k, v) = (m.unwrap()[1].clone(), m.unwrap()[2].clone());
            let mut touched = false;
            for o in ops.iter_mut().skip(victim + 1) {
                if o.kind != "ok" {
                    continue;
                }
                if let Some(mops) = o.value.as_array_mut() {
                    for m in mops {
                        if m[0] == "r" && m[1] == k {
                            if let Some(l) = m[2].as_array_mut() {
                                let before = l.len();
                                l.retain(|x| *x != v);
                                touched |= l.len() != before;
                            }
                        }
                    }
                }
            }
            if touched {
                let a = check(&ops);
                assert!(!a.is_empty(), "seed {seed}: lost append not detected");
            }
        }
    }

    #[test]
    fn elle_performance_20000_txns() {
        let ops = simulate(7, 20_000, 10, true);
        let start = Instant::now();
        let a = check(&ops);
        let took = start.elapsed();
        eprintln!("elle: checked {} events in {took:?}", ops.len());
        assert!(a.is_empty(), "{a:#?}");
        assert!(took.as_secs() < 30, "too slow: {took:?}");
    }

    #[test]
    fn elle_performance_bad_history() {
        // Every read serves a stale snapshot: many overlapping cycles, one giant component.
        let mut ops = simulate(11, 20_000, 10, true);
        let mut last_read: HashMap<String, Value> = HashMap::new();
        for o in ops.iter_mut() {
            if o.kind != "ok" {
                continue;
            }
            if let Some(mops) = o.value.as_array_mut() {
                for m in mops {
                    if m[0] == "r" {
                        let key = m[1].to_string();
                        let fresh = m[2].clone();
                        if let Some(old) = last_read.insert(key, fresh) {
                            if old.as_array().is_some_and(|l| !l.is_empty()) {
                                m[2] = old;
                            }
                        }
                    }
                }
            }
        }
        let start = Instant::now();
        let a = check(&ops);
        let took = start.elapsed();
        eprintln!("elle: bad history: {} lines in {took:?}: {a:#?}", a.len());
        assert!(!a.is_empty());
        assert!(a.len() <= MAX_LINES + 1);
        assert!(took.as_secs() < 60, "too slow: {took:?}");
    }
}
