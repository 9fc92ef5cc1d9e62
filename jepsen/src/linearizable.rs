//! Linearizability checker for the *register* workload: a set of independent integer registers
//! (Jepsen's "independent" keyed register), each read, written and compare-and-set by concurrent
//! clients. This module owns parsing register events out of a history, validating their shape,
//! and deciding, key by key, whether the recorded history is linearizable.
//!
//! Operations (`f`, with `value` as JSON; other `f` values are ignored):
//! - `write`: `[key, v]`, sets the register to `v`;
//! - `cas`: `[key, [from, to]]`, sets it to `to` if it holds `from` (`ok`), else does nothing;
//! - `read`: invoked with `[key, null]`, completes `ok` with `[key, v]`, where `v` is an integer or
//!   `null`.
//!
//! Model:
//! - every register starts as `null` (never written); a `cas` never succeeds on `null`;
//! - `ok`: the operation took effect exactly once, at some instant between its invocation and its
//!   completion;
//! - `fail`: it definitely did not take effect, and is dropped;
//! - `info` (outcome unknown), or an invocation that never completes before the history ends: a
//!   write or cas *may* have taken effect at any instant after its invocation, or never (it has an
//!   infinite return time and is optional); a read with an unknown outcome tells nothing and is
//!   dropped.
//!
//! The history is split by key and each key is checked on its own with the Wing & Gong / Lowe
//! (WGL) search: a depth-first search over linearization points that only linearizes operations
//! invoked before the earliest pending completion ("just in time"), memoizing configurations
//! (set of linearized operations, register value) so that each is explored once, plus a few
//! reductions that never lose a linearization (see [`check_key`]). The work is bounded by
//! [`MAX_CONFIGURATIONS`] per key (fewer for keys with thousands of operations, to bound memory).
//!
//! [`check`] returns one line per anomaly; an empty result means the history is linearizable.
//! Lines come in three flavours:
//! - `key K: not linearizable: ...` names the operation that could not be linearized (its `f`,
//!   value, process, invocation and completion times in ms) and the register values that were
//!   possible just before it;
//! - shape problems (a completion with no matching invocation, a malformed value, ...), which name
//!   the event by its position in the history;
//! - lines starting with `unknown:` mean the search gave up on a key (too many configurations):
//!   this is "could not decide", not an anomaly.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::history::Op;

/// The most configurations explored for one key before the search gives up (`unknown:`).
pub const MAX_CONFIGURATIONS: usize = 2_000_000;

/// How many possible register values a "not linearizable" line lists at most.
const MAX_REPORTED_STATES: usize = 8;

/// Checks a register history; returns one line per anomaly (empty = linearizable). Lines starting
/// with `unknown:` mean the check could not decide (search budget exhausted), not an anomaly.
pub fn check(history: &[Op]) -> Vec<String> {
    check_with_limit(history, MAX_CONFIGURATIONS)
}

/// [`check`] with an explicit per-key budget of explored configurations.
fn check_with_limit(history: &[Op], limit: usize) -> Vec<String> {
    let (by_key, mut anomalies) = parse(history);
    for (key, ops) in &by_key {
        match check_key(ops, limit) {
            Outcome::Linearizable => {}
            Outcome::Unknown { explored } => anomalies.push(format!(
                "unknown: key {key}: linearizability not decided, gave up after exploring \
                 {explored} configurations ({} operations on this key)",
                ops.len()
            )),
            Outcome::NotLinearizable { op, states } => {
                let op = &ops[op];
                let states: Vec<String> = states.iter().map(|s| fmt_state(*s)).collect();
                anomalies.push(format!(
                    "key {key}: not linearizable: {} {} by process {} (invoked at {}, completed \
                     at {}) cannot be linearized; register value(s) possible just before it: [{}] \
                     ({} operations on this key)",
                    op.action.f(),
                    op.value,
                    op.process,
                    fmt_ms(op.call_ns),
                    op.ret_ns.map(fmt_ms).unwrap_or_else(|| "never".to_string()),
                    states.join(", "),
                    ops.len()
                ));
            }
        }
    }
    anomalies
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A register value: `None` is `null` (never written).
type State = Option<i64>;

/// What an operation does to its register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// A read that returned this value.
    Read(State),
    /// A write of this value.
    Write(i64),
    /// A compare-and-set from the first value to the second.
    Cas(State, i64),
}

impl Action {
    fn f(&self) -> &'static str {
        match self {
            Action::Read(_) => "read",
            Action::Write(_) => "write",
            Action::Cas(..) => "cas",
        }
    }

    /// The register value after applying this operation to `state`, or `None` if it cannot apply.
    fn step(&self, state: State) -> Option<State> {
        match *self {
            Action::Read(v) => (v == state).then_some(state),
            Action::Write(v) => Some(Some(v)),
            Action::Cas(from, to) => (from.is_some() && from == state).then_some(Some(to)),
        }
    }

    /// The value this operation needs to find in the register, if any.
    fn observes(&self) -> Option<State> {
        match *self {
            Action::Read(v) => Some(v),
            Action::Write(_) => None,
            Action::Cas(from, _) => Some(from),
        }
    }

    /// The value this operation leaves in the register, if it changes it.
    fn produces(&self) -> Option<i64> {
        match *self {
            Action::Read(_) => None,
            Action::Write(v) | Action::Cas(_, v) => Some(v),
        }
    }
}

/// One register operation of a key's sub-history.
#[derive(Clone, Debug)]
struct RegOp {
    action: Action,
    process: u64,
    /// The value shown in messages (the completion's for reads, the invocation's otherwise).
    value: Value,
    /// Position of the invocation in the history.
    call: usize,
    /// Position of the `ok` completion; `None` if the outcome is unknown (optional operation).
    ret: Option<usize>,
    call_ns: u64,
    ret_ns: Option<u64>,
}

/// An invocation waiting for its completion.
struct Pending {
    index: usize,
    /// The key and action, or `None` if the invocation was malformed (already reported).
    parsed: Option<(i64, Action)>,
}

fn is_register_f(f: &str) -> bool {
    matches!(f, "read" | "write" | "cas")
}

/// Splits the history into per-key operations, reporting shape problems.
fn parse(history: &[Op]) -> (BTreeMap<i64, Vec<RegOp>>, Vec<String>) {
    let mut by_key: BTreeMap<i64, Vec<RegOp>> = BTreeMap::new();
    let mut anomalies = Vec::new();
    let mut pending: HashMap<u64, Pending> = HashMap::new();

    for (index, op) in history.iter().enumerate() {
        if !is_register_f(&op.f) {
            continue;
        }
        match op.kind.as_str() {
            "invoke" => {
                if let Some(previous) = pending.remove(&op.process) {
                    anomalies.push(format!(
                        "{}: process {} invoked again while its {} invoked at event {} was still \
                         outstanding (treated as outcome unknown)",
                        describe(index, op),
                        op.process,
                        history[previous.index].f,
                        previous.index
                    ));
                    add_unknown(&mut by_key, history, &previous);
                }
                let parsed = match parse_invoke(op) {
                    Ok(parsed) => Some(parsed),
                    Err(why) => {
                        anomalies.push(format!(
                            "{}: malformed invocation: {why}",
                            describe(index, op)
                        ));
                        None
                    }
                };
                pending.insert(op.process, Pending { index, parsed });
            }
            "ok" | "fail" | "info" => {
                let Some(invoke) = pending.remove(&op.process) else {
                    anomalies.push(format!(
                        "{}: completion with no matching invocation for process {}",
                        describe(index, op),
                        op.process
                    ));
                    continue;
                };
                let invoked = &history[invoke.index];
                if invoked.f != op.f {
                    anomalies.push(format!(
                        "{}: completion does not match the process's pending {} invoked at event \
                         {} (treated as outcome unknown)",
                        describe(index, op),
                        invoked.f,
                        invoke.index
                    ));
                    add_unknown(&mut by_key, history, &invoke);
                    continue;
                }
                let Some((key, action)) = invoke.parsed else {
                    continue; // malformed invocation, already reported
                };
                match op.kind.as_str() {
                    "fail" => {} // definitely did not happen
                    "info" => add_unknown(&mut by_key, history, &invoke),
                    _ => match complete_ok(op, key, action) {
                        Ok(action) => {
                            let value = match action {
                                Action::Read(_) => op.value.clone(),
                                _ => invoked.value.clone(),
                            };
                            by_key.entry(key).or_default().push(RegOp {
                                action,
                                process: op.process,
                                value,
                                call: invoke.index,
                                ret: Some(index),
                                call_ns: invoked.time,
                                ret_ns: Some(op.time),
                            });
                        }
                        Err(why) => {
                            anomalies.push(format!(
                                "{}: malformed completion: {why}",
                                describe(index, op)
                            ));
                            // A write or cas that completed ok still happened; keep it as
                            // possibly-happened rather than lose it. A read tells nothing.
                            add_unknown(&mut by_key, history, &invoke);
                        }
                    },
                }
            }
            other => anomalies.push(format!(
                "{}: unknown event type {other:?}",
                describe(index, op)
            )),
        }
    }

    // Invocations that never completed: outcome unknown.
    let mut leftovers: Vec<Pending> = pending.into_values().collect();
    leftovers.sort_by_key(|p| p.index);
    for invoke in &leftovers {
        add_unknown(&mut by_key, history, invoke);
    }
    for ops in by_key.values_mut() {
        ops.sort_by_key(|o| o.call);
    }
    (by_key, anomalies)
}

/// Records an invocation whose outcome is unknown: writes and cas become optional operations,
/// reads are dropped.
fn add_unknown(by_key: &mut BTreeMap<i64, Vec<RegOp>>, history: &[Op], invoke: &Pending) {
    let Some((key, action)) = invoke.parsed else {
        return;
    };
    if matches!(action, Action::Read(_)) {
        return;
    }
    let invoked = &history[invoke.index];
    by_key.entry(key).or_default().push(RegOp {
        action,
        process: invoked.process,
        value: invoked.value.clone(),
        call: invoke.index,
        ret: None,
        call_ns: invoked.time,
        ret_ns: None,
    });
}

/// Parses an invocation into its key and action (reads get a placeholder result).
fn parse_invoke(op: &Op) -> Result<(i64, Action), String> {
    let (key, arg) = parse_pair(&op.value)?;
    let action = match op.f.as_str() {
        "read" => Action::Read(None),
        "write" => Action::Write(parse_int(arg, "written value")?),
        _ => {
            let (from, to) = as_pair(arg).map_err(|e| format!("cas argument: {e}"))?;
            let from = parse_state(from)
                .ok_or_else(|| format!("cas `from` should be an integer or null, got {from}"))?;
            Action::Cas(from, parse_int(to, "cas `to`")?)
        }
    };
    Ok((key, action))
}

/// Validates an `ok` completion against its invocation; returns the final action (with the
/// read's result).
fn complete_ok(op: &Op, key: i64, action: Action) -> Result<Action, String> {
    let (done_key, arg) = parse_pair(&op.value)?;
    if done_key != key {
        return Err(format!("key {done_key} differs from the invoked key {key}"));
    }
    match action {
        Action::Read(_) => {
            let v = parse_state(arg)
                .ok_or_else(|| format!("read value should be an integer or null, got {arg}"))?;
            Ok(Action::Read(v))
        }
        Action::Write(v) => {
            let done = parse_int(arg, "written value")?;
            if done != v {
                return Err(format!("written value {done} differs from the invoked {v}"));
            }
            Ok(action)
        }
        Action::Cas(from, to) => {
            let (f, t) = as_pair(arg).map_err(|e| format!("cas argument: {e}"))?;
            if parse_state(f) != Some(from) || t.as_i64() != Some(to) {
                return Err(format!(
                    "cas argument {arg} differs from the invoked [{}, {to}]",
                    fmt_state(from)
                ));
            }
            Ok(action)
        }
    }
}

/// `[key, b]` with an integer key.
fn parse_pair(v: &Value) -> Result<(i64, &Value), String> {
    let (key, b) = as_pair(v)?;
    Ok((parse_int(key, "key")?, b))
}

/// `[a, b]`.
fn as_pair(v: &Value) -> Result<(&Value, &Value), String> {
    match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => Ok((a, b)),
        _ => Err(format!("expected a two-element array, got {v}")),
    }
}

fn parse_int(v: &Value, what: &str) -> Result<i64, String> {
    v.as_i64()
        .ok_or_else(|| format!("{what} should be an integer, got {v}"))
}

/// An integer or `null`.
fn parse_state(v: &Value) -> Option<State> {
    if v.is_null() {
        Some(None)
    } else {
        v.as_i64().map(Some)
    }
}

fn describe(index: usize, op: &Op) -> String {
    format!(
        "event {index} ({} {} {} by process {} at {})",
        op.kind,
        op.f,
        op.value,
        op.process,
        fmt_ms(op.time)
    )
}

fn fmt_ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

fn fmt_state(s: State) -> String {
    match s {
        Some(v) => v.to_string(),
        None => "null".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// The WGL search
// ---------------------------------------------------------------------------------------------

/// The verdict for one key. Operation indices refer to the key's operation list.
#[derive(Debug, PartialEq)]
enum Outcome {
    Linearizable,
    /// `op` could not be linearized; `states` are register values possible just before it.
    NotLinearizable {
        op: usize,
        states: Vec<State>,
    },
    /// The search budget ran out.
    Unknown {
        explored: usize,
    },
}

/// Memory the configuration cache of one key may use (roughly); keys with very many operations
/// get a proportionally smaller configuration budget.
const MAX_CACHE_BYTES: usize = 256 << 20;

/// The part of a configuration that must match exactly for memoization: which required
/// operations are linearized, the register value, and whether the last linearized operation
/// was optional (then the next one must observe its value). `hash` is a Zobrist hash of
/// `required`, maintained incrementally so that lookups do not rehash the whole set.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    required: Vec<u64>,
    state: State,
    after_optional: bool,
    hash: u64,
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.hash.hash(h);
        self.state.hash(h);
        self.after_optional.hash(h);
    }
}

fn has_bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn flip_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] ^= 1 << (i % 64);
}

/// Whether every bit of `a` is set in `b`.
fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

/// A well-mixed 64-bit value for `i` (splitmix64), used as Zobrist key.
fn zobrist(i: usize) -> u64 {
    let mut z = (i as u64)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// End of an event list.
const NIL: usize = usize::MAX;
/// Head of the list of required operations' calls and returns.
const HEAD_REQUIRED: usize = 0;
/// Head of the list of optional operations' calls.
const HEAD_OPTIONAL: usize = 1;

/// A linearized operation on the search stack, with what to restore when undoing it.
struct Frame {
    op: usize,
    state: State,
    after_optional: bool,
    /// Linearized as the only option of its configuration (a read of the current value).
    forced: bool,
}

/// The result of trying to linearize an operation.
enum Try {
    Done,
    /// Not allowed now, or the register value does not fit.
    Refused,
    /// The resulting configuration is known to lead nowhere.
    Subsumed,
    /// The budget of configurations is spent.
    OutOfBudget,
}

/// Checks one key's operations (sorted by invocation) exploring at most `limit` configurations.
///
/// The search keeps two event lists in history order: calls and returns of required (`ok`)
/// operations, and calls of optional (unknown outcome) ones. Candidates for the next
/// linearization point are the required calls before the first remaining return, then the
/// optional calls before that return. The search space is reduced by rules that each keep at
/// least one linearization if there is any (a valid order can be rewritten to obey them):
/// - an optional operation that writes a value no remaining operation observes (reads, or cas
///   from) is never linearized: whatever follows it is a write, so leaving it out changes
///   nothing; and it is linearized only "just in time", immediately before an operation that
///   observes its value;
/// - of two identical optional operations the earlier invoked is used first; of two identical
///   required ones, if one is invoked and completes earlier, it is linearized first (swapping
///   them keeps an order valid);
/// - a read of the current value, when it may be linearized, is linearized at once and is the
///   only option tried: reads change nothing, so it can be moved to the front of any valid
///   continuation.
///
/// Memoization: a configuration is an exact part ([`Key`]) plus the set of optional operations
/// used. Having used fewer optional operations never hurts (by the rules above, "fewer" is a
/// per-kind count), so a configuration is skipped when a fully explored, failed configuration
/// with the same exact part used a subset of its optional operations.
fn check_key(all: &[RegOp], limit: usize) -> Outcome {
    // Prune optional operations whose written value nobody (still considered) ever needs to see.
    // Repeat until stable, since dropping an optional cas can make the value it needed
    // unobserved.
    let mut kept: Vec<usize> = (0..all.len()).collect();
    loop {
        let observed: HashSet<State> = kept
            .iter()
            .filter_map(|&i| all[i].action.observes())
            .collect();
        let before = kept.len();
        kept.retain(|&i| {
            let op = &all[i];
            op.ret.is_some()
                || op
                    .action
                    .produces()
                    .is_some_and(|v| observed.contains(&Some(v)))
        });
        if kept.len() == before {
            break;
        }
    }
    let ops: Vec<&RegOp> = kept.iter().map(|&i| &all[i]).collect();
    let mut search = Search::new(ops, limit);
    match search.run() {
        Outcome::NotLinearizable { op, states } => Outcome::NotLinearizable {
            op: kept[op],
            states,
        },
        other => other,
    }
}

/// The state of the search for one key.
struct Search<'a> {
    ops: Vec<&'a RegOp>,
    /// Index of each operation among the required, or among the optional, operations.
    dense: Vec<usize>,
    /// Zobrist keys of the required operations (by dense index).
    zobrist_keys: Vec<u64>,
    /// Interned value each operation observes, if any.
    observes_slot: Vec<Option<usize>>,
    /// For optional operations: the interned value they write.
    produces_slot: Vec<Option<usize>>,
    /// Per interned value: operations not yet linearized that observe it.
    observers: Vec<usize>,
    /// An identical operation that must be linearized before this one.
    twin_before: Vec<Option<usize>>,
    /// Events (history position, op, is call); node k + 2 is events[k].
    events: Vec<(usize, usize, bool)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_node: Vec<usize>,
    ret_node: Vec<usize>,
    /// Required operations not yet linearized.
    required: usize,
    key: Key,
    /// Optional operations used (by dense index).
    used: Vec<u64>,
    /// Fully explored configurations that led nowhere: per exact part, the optional sets used
    /// (an antichain: no entry is a superset of another).
    failed: HashMap<Key, Vec<Vec<u64>>>,
    explored: usize,
    budget: usize,
    stack: Vec<Frame>,
    /// The furthest return the search got stuck at, and the values possible there.
    stuck: Option<(usize, Vec<State>)>,
}

impl<'a> Search<'a> {
    fn new(ops: Vec<&'a RegOp>, limit: usize) -> Search<'a> {
        let n = ops.len();
        let mut dense = Vec::with_capacity(n);
        let (mut n_required, mut n_optional) = (0usize, 0usize);
        for op in &ops {
            let counter = if op.ret.is_some() {
                &mut n_required
            } else {
                &mut n_optional
            };
            dense.push(*counter);
            *counter += 1;
        }

        let mut slots: HashMap<State, usize> = HashMap::new();
        let mut observers: Vec<usize> = Vec::new();
        let mut observes_slot = Vec::with_capacity(n);
        for op in &ops {
            observes_slot.push(op.action.observes().map(|v| {
                let fresh = slots.len();
                let slot = *slots.entry(v).or_insert(fresh);
                if slot == observers.len() {
                    observers.push(0);
                }
                observers[slot] += 1;
                slot
            }));
        }
        let produces_slot = ops
            .iter()
            .map(|op| match op.ret {
                Some(_) => None,
                None => op
                    .action
                    .produces()
                    .and_then(|v| slots.get(&Some(v)).copied()),
            })
            .collect();

        // Optional: the previous identical optional operation. Required: the nearest previous
        // identical required operation that also completed earlier.
        let mut previous: HashMap<(Action, bool), Vec<usize>> = HashMap::new();
        let mut twin_before = Vec::with_capacity(n);
        for (i, op) in ops.iter().enumerate() {
            let same = previous.entry((op.action, op.ret.is_some())).or_default();
            twin_before.push(match op.ret {
                None => same.last().copied(),
                Some(ret) => same
                    .iter()
                    .rev()
                    .copied()
                    .find(|&j| ops[j].ret.is_some_and(|r| r < ret)),
            });
            same.push(i);
        }

        let mut events = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            events.push((op.call, i, true));
            if let Some(ret) = op.ret {
                events.push((ret, i, false));
            }
        }
        events.sort_unstable();
        let nodes = events.len() + 2;
        let mut next = vec![NIL; nodes];
        let mut prev = vec![NIL; nodes];
        let mut tails = [HEAD_REQUIRED, HEAD_OPTIONAL];
        let mut call_node = vec![NIL; n];
        let mut ret_node = vec![NIL; n];
        for (k, &(_, i, is_call)) in events.iter().enumerate() {
            let node = k + 2;
            let list = if ops[i].ret.is_some() {
                HEAD_REQUIRED
            } else {
                HEAD_OPTIONAL
            };
            next[tails[list]] = node;
            prev[node] = tails[list];
            tails[list] = node;
            if is_call {
                call_node[i] = node;
            } else {
                ret_node[i] = node;
            }
        }

        let (required_words, optional_words) = (n_required.div_ceil(64), n_optional.div_ceil(64));
        Search {
            dense,
            zobrist_keys: (0..n_required).map(zobrist).collect(),
            observes_slot,
            produces_slot,
            observers,
            twin_before,
            events,
            next,
            prev,
            call_node,
            ret_node,
            required: n_required,
            key: Key {
                required: vec![0; required_words],
                state: None,
                after_optional: false,
                hash: 0,
            },
            used: vec![0; optional_words],
            failed: HashMap::new(),
            explored: 0,
            budget: limit.min(MAX_CACHE_BYTES / (8 * (required_words + optional_words) + 160)),
            stack: Vec::new(),
            stuck: None,
            ops,
        }
    }

    fn position(&self, node: usize) -> usize {
        self.events[node - 2].0
    }

    fn node_op(&self, node: usize) -> usize {
        self.events[node - 2].1
    }

    fn is_call(&self, node: usize) -> bool {
        self.events[node - 2].2
    }

    fn is_linearized(&self, i: usize) -> bool {
        match self.ops[i].ret {
            Some(_) => has_bit(&self.key.required, self.dense[i]),
            None => has_bit(&self.used, self.dense[i]),
        }
    }

    /// Adds or removes operation `i` from the configuration's sets.
    fn flip(&mut self, i: usize) {
        let d = self.dense[i];
        if self.ops[i].ret.is_some() {
            flip_bit(&mut self.key.required, d);
            self.key.hash ^= self.zobrist_keys[d];
        } else {
            flip_bit(&mut self.used, d);
        }
    }

    /// The first remaining return in the required list (`NIL` if none).
    fn first_return(&self) -> usize {
        let mut node = self.next[HEAD_REQUIRED];
        while node != NIL && self.is_call(node) {
            node = self.next[node];
        }
        node
    }

    /// The register value after linearizing `i` now, if the rules allow it.
    fn step(&self, i: usize) -> Option<State> {
        let op = self.ops[i];
        if self.key.after_optional && matches!(op.action, Action::Write(_)) {
            return None;
        }
        if self.twin_before[i].is_some_and(|t| !self.is_linearized(t)) {
            return None;
        }
        let observed = self.produces_slot[i].is_some_and(|s| self.observers[s] > 0);
        if op.ret.is_none() && !observed {
            return None;
        }
        op.action.step(self.key.state)
    }

    /// A required read of the current value that may be linearized now.
    fn forced_read(&self) -> Option<usize> {
        let mut node = self.next[HEAD_REQUIRED];
        while node != NIL && self.is_call(node) {
            let i = self.node_op(node);
            if matches!(self.ops[i].action, Action::Read(_)) && self.step(i).is_some() {
                return Some(i);
            }
            node = self.next[node];
        }
        None
    }

    fn try_linearize(&mut self, i: usize, forced: bool) -> Try {
        let Some(new_state) = self.step(i) else {
            return Try::Refused;
        };
        let (state, after_optional) = (self.key.state, self.key.after_optional);
        self.flip(i);
        self.key.state = new_state;
        self.key.after_optional = self.ops[i].ret.is_none();
        let subsumed = self
            .failed
            .get(&self.key)
            .is_some_and(|entries| entries.iter().any(|e| is_subset(e, &self.used)));
        if subsumed || self.explored >= self.budget {
            self.flip(i);
            self.key.state = state;
            self.key.after_optional = after_optional;
            return if subsumed {
                Try::Subsumed
            } else {
                Try::OutOfBudget
            };
        }
        self.explored += 1;
        self.stack.push(Frame {
            op: i,
            state,
            after_optional,
            forced,
        });
        if self.ops[i].ret.is_some() {
            self.required -= 1;
        }
        if let Some(s) = self.observes_slot[i] {
            self.observers[s] -= 1;
        }
        // Lift the call and its return out of the lists.
        for node in [self.call_node[i], self.ret_node[i]] {
            if node != NIL {
                let (p, q) = (self.prev[node], self.next[node]);
                self.next[p] = q;
                if q != NIL {
                    self.prev[q] = p;
                }
            }
        }
        Try::Done
    }

    /// Records the current configuration as failed and undoes the last linearized operation.
    fn undo(&mut self) -> Option<Frame> {
        let frame = self.stack.pop()?;
        let entries = self.failed.entry(self.key.clone()).or_default();
        entries.retain(|e| !is_subset(&self.used, e));
        entries.push(self.used.clone());

        let i = frame.op;
        self.flip(i);
        self.key.state = frame.state;
        self.key.after_optional = frame.after_optional;
        if self.ops[i].ret.is_some() {
            self.required += 1;
        }
        if let Some(s) = self.observes_slot[i] {
            self.observers[s] += 1;
        }
        // Put the return, then the call, back (reverse order of lifting).
        for node in [self.ret_node[i], self.call_node[i]] {
            if node != NIL {
                let (p, q) = (self.prev[node], self.next[node]);
                self.next[p] = node;
                if q != NIL {
                    self.prev[q] = node;
                }
            }
        }
        Some(frame)
    }

    /// Notes that nothing more can be linearized before `blocking` returns.
    fn record_stuck(&mut self, blocking: usize) {
        if blocking == NIL {
            return;
        }
        let i = self.node_op(blocking);
        let (here, state) = (self.ops[i].ret, self.key.state);
        match &mut self.stuck {
            Some((j, states)) if self.ops[*j].ret == here => {
                if !states.contains(&state) && states.len() < MAX_REPORTED_STATES {
                    states.push(state);
                }
            }
            Some((j, _)) if self.ops[*j].ret > here => {}
            _ => self.stuck = Some((i, vec![state])),
        }
    }

    fn run(&mut self) -> Outcome {
        // Where the walk is: `entry` in the required list, or (once it reached the first
        // remaining return, `blocking`) in the optional list, among calls before that return.
        let mut entry = NIL;
        let mut in_optional = false;
        let mut blocking = NIL;
        // Whether we just arrived at a new configuration.
        let mut fresh = true;
        loop {
            if self.required == 0 {
                return Outcome::Linearizable;
            }
            let mut dead = false;
            if fresh {
                fresh = false;
                entry = self.next[HEAD_REQUIRED];
                in_optional = false;
                if let Some(i) = self.forced_read() {
                    match self.try_linearize(i, true) {
                        Try::Done => {
                            fresh = true;
                            continue;
                        }
                        Try::OutOfBudget => {
                            return Outcome::Unknown {
                                explored: self.explored,
                            }
                        }
                        // Its only continuation leads nowhere.
                        Try::Subsumed | Try::Refused => dead = true,
                    }
                }
            }
            if !dead {
                let candidate = if !in_optional {
                    if entry != NIL && self.is_call(entry) {
                        Some(entry)
                    } else {
                        // The first remaining return: now try the optional operations.
                        blocking = entry;
                        in_optional = true;
                        entry = self.next[HEAD_OPTIONAL];
                        continue;
                    }
                } else if entry != NIL
                    && (blocking == NIL || self.position(entry) < self.position(blocking))
                {
                    Some(entry)
                } else {
                    None
                };
                if let Some(node) = candidate {
                    entry = self.next[node];
                    match self.try_linearize(self.node_op(node), false) {
                        Try::Done => fresh = true,
                        Try::OutOfBudget => {
                            return Outcome::Unknown {
                                explored: self.explored,
                            }
                        }
                        Try::Subsumed | Try::Refused => {}
                    }
                    continue;
                }
                self.record_stuck(blocking);
            }
            // Backtrack: undo operations until one whose configuration has alternatives left.
            loop {
                let Some(frame) = self.undo() else {
                    return match self.stuck.take() {
                        Some((op, states)) => Outcome::NotLinearizable { op, states },
                        // Unreachable: with required operations left there is always a return.
                        None => Outcome::Unknown {
                            explored: self.explored,
                        },
                    };
                };
                if !frame.forced {
                    entry = self.next[self.call_node[frame.op]];
                    in_optional = self.ops[frame.op].ret.is_none();
                    if in_optional {
                        blocking = self.first_return();
                    }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    /// A history builder: each event is 1 ms after the previous one.
    #[derive(Default)]
    struct H {
        ops: Vec<Op>,
    }

    impl H {
        fn ev(&mut self, kind: &str, process: u64, f: &str, value: Value) -> &mut Self {
            let time = (self.ops.len() as u64 + 1) * 1_000_000;
            self.ops.push(Op {
                kind: kind.to_string(),
                process,
                f: f.to_string(),
                value,
                time,
            });
            self
        }
        fn inv(&mut self, p: u64, f: &str, value: Value) -> &mut Self {
            self.ev("invoke", p, f, value)
        }
        fn ok(&mut self, p: u64, f: &str, value: Value) -> &mut Self {
            self.ev("ok", p, f, value)
        }
        fn fail(&mut self, p: u64, f: &str, value: Value) -> &mut Self {
            self.ev("fail", p, f, value)
        }
        fn info(&mut self, p: u64, f: &str, value: Value) -> &mut Self {
            self.ev("info", p, f, value)
        }
        /// A complete write.
        fn write(&mut self, p: u64, k: i64, v: i64) -> &mut Self {
            self.inv(p, "write", json!([k, v]))
                .ok(p, "write", json!([k, v]))
        }
        /// A complete read returning `v`.
        fn read(&mut self, p: u64, k: i64, v: Value) -> &mut Self {
            self.inv(p, "read", json!([k, null]))
                .ok(p, "read", json!([k, v]))
        }
        /// A complete successful cas.
        fn cas(&mut self, p: u64, k: i64, from: i64, to: i64) -> &mut Self {
            self.inv(p, "cas", json!([k, [from, to]]))
                .ok(p, "cas", json!([k, [from, to]]))
        }
    }

    fn assert_ok(h: &H) {
        let a = check(&h.ops);
        assert!(a.is_empty(), "expected linearizable, got {a:#?}");
    }

    /// Asserts exactly one "not linearizable" line, for `key`, mentioning `needle`.
    fn assert_bad(h: &H, key: i64, needle: &str) -> String {
        let a = check(&h.ops);
        assert_eq!(a.len(), 1, "expected one anomaly, got {a:#?}");
        let line = a[0].clone();
        assert!(
            line.starts_with(&format!("key {key}: not linearizable")),
            "{line}"
        );
        assert!(line.contains(needle), "{line} should mention {needle}");
        assert!(!line.contains('\n'));
        line
    }

    #[test]
    fn empty_and_unrelated_histories_are_fine() {
        assert_ok(&H::default());
        let mut h = H::default();
        h.inv(0, "add", json!(1)).ok(0, "add", json!(1));
        h.inv(1, "txn", json!("whatever"))
            .info(1, "txn", json!(null));
        assert_ok(&h);
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = H::default();
        h.read(0, 1, json!(null))
            .write(0, 1, 1)
            .read(1, 1, json!(1))
            .cas(2, 1, 1, 2)
            .read(0, 1, json!(2))
            .write(1, 1, 3)
            .read(2, 1, json!(3));
        // A failed cas changes nothing.
        h.inv(0, "cas", json!([1, [7, 8]]))
            .fail(0, "cas", json!([1, [7, 8]]))
            .read(0, 1, json!(3));
        assert_ok(&h);
    }

    #[test]
    fn concurrent_writes_and_a_read_seeing_either_value() {
        for seen in [1, 2] {
            let mut h = H::default();
            h.inv(0, "write", json!([0, 1]))
                .inv(1, "write", json!([0, 2]))
                .inv(2, "read", json!([0, null]))
                .ok(0, "write", json!([0, 1]))
                .ok(1, "write", json!([0, 2]))
                .ok(2, "read", json!([0, seen]))
                // After both writes: either one can be last, consistently.
                .read(2, 0, json!(seen))
                .read(3, 0, json!(seen));
            assert_ok(&h);
        }
        // The read was concurrent with both writes and may even see null.
        let mut h = H::default();
        h.inv(0, "write", json!([0, 1]))
            .inv(2, "read", json!([0, null]))
            .ok(2, "read", json!([0, null]))
            .ok(0, "write", json!([0, 1]));
        assert_ok(&h);
    }

    #[test]
    fn stale_read_after_completed_writes_is_caught() {
        let mut h = H::default();
        h.write(0, 0, 1).write(1, 0, 2).read(2, 0, json!(1));
        let line = assert_bad(&h, 0, "read [0,1] by process 2");
        assert!(
            line.contains("invoked at 5.000 ms, completed at 6.000 ms"),
            "{line}"
        );
        assert!(line.contains("possible just before it: [2]"), "{line}");
    }

    #[test]
    fn read_of_a_value_never_written_is_caught() {
        let mut h = H::default();
        h.write(0, 0, 1).read(1, 0, json!(7));
        assert_bad(&h, 0, "read [0,7]");
    }

    #[test]
    fn read_of_null_after_a_completed_write_is_caught() {
        let mut h = H::default();
        h.write(0, 0, 1).read(1, 0, json!(null));
        assert_bad(&h, 0, "read [0,null]");
    }

    #[test]
    fn cas_consistent_and_inconsistent() {
        let mut h = H::default();
        h.write(0, 0, 1)
            .cas(1, 0, 1, 2)
            .read(2, 0, json!(2))
            .cas(0, 0, 2, 3);
        assert_ok(&h);

        // cas from a value the register did not hold.
        let mut h = H::default();
        h.write(0, 0, 1).cas(1, 0, 5, 6);
        assert_bad(&h, 0, "cas [0,[5,6]]");

        // cas succeeded, but a later read sees the old value.
        let mut h = H::default();
        h.write(0, 0, 1).cas(1, 0, 1, 2).read(2, 0, json!(1));
        assert_bad(&h, 0, "read [0,1]");

        // cas from null never succeeds.
        let mut h = H::default();
        h.inv(0, "cas", json!([0, [null, 1]]))
            .ok(0, "cas", json!([0, [null, 1]]));
        assert_bad(&h, 0, "cas [0,[null,1]]");

        // Two concurrent cas from the same value cannot both succeed.
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "cas", json!([0, [1, 2]]))
            .inv(2, "cas", json!([0, [1, 3]]))
            .ok(1, "cas", json!([0, [1, 2]]))
            .ok(2, "cas", json!([0, [1, 3]]));
        assert_bad(&h, 0, "cas");
    }

    #[test]
    fn info_writes_may_or_may_not_take_effect() {
        // Read later: it took effect.
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "write", json!([0, 5]))
            .info(1, "write", json!([0, 5]))
            .read(2, 0, json!(1))
            .read(2, 0, json!(5))
            .read(3, 0, json!(5));
        assert_ok(&h);

        // Never read: it did not (or was overwritten).
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "write", json!([0, 5]))
            .info(1, "write", json!([0, 5]))
            .read(2, 0, json!(1))
            .write(2, 0, 3)
            .read(3, 0, json!(3));
        assert_ok(&h);

        // Never completed at all: same as info.
        let mut h = H::default();
        h.inv(1, "write", json!([0, 5]))
            .read(2, 0, json!(null))
            .read(2, 0, json!(5));
        assert_ok(&h);

        // An info cas that took effect.
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "cas", json!([0, [1, 2]]))
            .info(1, "cas", json!([0, [1, 2]]))
            .read(2, 0, json!(2));
        assert_ok(&h);

        // But it takes effect once: after the value was seen and overwritten, it cannot return.
        let mut h = H::default();
        h.inv(1, "write", json!([0, 5]))
            .info(1, "write", json!([0, 5]))
            .read(2, 0, json!(5))
            .write(2, 0, 6)
            .read(2, 0, json!(5));
        assert_bad(&h, 0, "read [0,5]");

        // Nor take effect before it was invoked.
        let mut h = H::default();
        h.read(2, 0, json!(5))
            .inv(1, "write", json!([0, 5]))
            .info(1, "write", json!([0, 5]));
        assert_bad(&h, 0, "read [0,5]");
    }

    #[test]
    fn failed_write_whose_value_is_read_is_caught() {
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "write", json!([0, 2]))
            .fail(1, "write", json!([0, 2]))
            .read(2, 0, json!(2));
        assert_bad(&h, 0, "read [0,2]");
    }

    #[test]
    fn reads_with_unknown_outcome_are_ignored() {
        let mut h = H::default();
        h.write(0, 0, 1)
            .inv(1, "read", json!([0, null]))
            .info(1, "read", json!([0, null]))
            .inv(2, "read", json!([0, null]))
            .fail(2, "read", json!([0, null]))
            .inv(3, "read", json!([0, null]));
        assert_ok(&h);
    }

    #[test]
    fn only_the_bad_key_is_reported() {
        let mut h = H::default();
        h.write(0, 1, 1)
            .write(1, 2, 1)
            .write(0, 1, 2)
            .write(1, 2, 2)
            .read(2, 1, json!(2))
            .read(3, 2, json!(1));
        let line = assert_bad(&h, 2, "read [2,1]");
        assert!(!line.contains("key 1"), "{line}");
    }

    #[test]
    fn shape_problems_are_reported_without_panicking() {
        let mut h = H::default();
        h.ok(0, "write", json!([0, 1])); // no invocation
        let a = check(&h.ops);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert!(a[0].contains("no matching invocation"), "{}", a[0]);

        let garbage = [
            json!(null),
            json!("x"),
            json!([]),
            json!([1]),
            json!([1, 2, 3]),
            json!(["k", 1]),
            json!([1.5, 1]),
            json!([u64::MAX, 1]),
            json!([0, "v"]),
            json!([0, [1]]),
            json!([0, [1, null]]),
            json!([0, {"a": 1}]),
        ];
        for f in ["read", "write", "cas"] {
            for v in &garbage {
                // Malformed invocation.
                let mut h = H::default();
                h.inv(0, f, v.clone())
                    .ok(0, f, v.clone())
                    .read(1, 0, json!(null));
                let _ = check(&h.ops);
                // Malformed completion of a well-formed invocation.
                let good = match f {
                    "read" => json!([0, null]),
                    "write" => json!([0, 1]),
                    _ => json!([0, [1, 2]]),
                };
                let mut h = H::default();
                h.inv(0, f, good).ok(0, f, v.clone());
                let a = check(&h.ops);
                assert!(a.iter().any(|l| l.contains("malformed")), "{f} {v}: {a:#?}");
            }
        }

        // A malformed write invocation is reported once.
        let mut h = H::default();
        h.inv(0, "write", json!([0, "v"]))
            .ok(0, "write", json!([0, "v"]));
        let a = check(&h.ops);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert!(a[0].contains("malformed invocation"), "{}", a[0]);

        // Unknown event types, double invocations, mismatched completions.
        let mut h = H::default();
        h.ev("weird", 0, "read", json!([0, null]))
            .inv(1, "write", json!([0, 1]))
            .inv(1, "write", json!([0, 2]))
            .ok(1, "write", json!([0, 2]))
            .inv(2, "write", json!([0, 3]))
            .ok(2, "read", json!([0, 3]))
            .ok(2, "read", json!([0, 3]));
        let a = check(&h.ops);
        assert!(a.iter().any(|l| l.contains("unknown event type")), "{a:#?}");
        assert!(a.iter().any(|l| l.contains("invoked again")), "{a:#?}");
        assert!(a.iter().any(|l| l.contains("does not match")), "{a:#?}");
        assert!(
            a.iter().any(|l| l.contains("no matching invocation")),
            "{a:#?}"
        );
        assert!(!a.iter().any(|l| l.contains("not linearizable")), "{a:#?}");
    }

    #[test]
    fn exhausted_budget_is_reported_as_unknown() {
        let mut h = H::default();
        h.inv(0, "write", json!([0, 1]))
            .inv(1, "write", json!([0, 2]))
            .inv(2, "read", json!([0, null]))
            .ok(0, "write", json!([0, 1]))
            .ok(1, "write", json!([0, 2]))
            .ok(2, "read", json!([0, 1]));
        let a = check_with_limit(&h.ops, 1);
        assert_eq!(a.len(), 1, "{a:#?}");
        assert!(a[0].starts_with("unknown: key 0:"), "{}", a[0]);
        assert!(check(&h.ops).is_empty());
    }

    // -- Randomized histories -----------------------------------------------------------------

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    struct InFlight {
        key: i64,
        action: Action,
        /// The result once the operation took effect: the read value, or whether a cas applied.
        result: Option<(State, bool)>,
    }

    /// A simulated workload.
    struct Sim {
        processes: u64,
        keys: i64,
        ops: usize,
        /// Written values are drawn from `0..values`; `None`: every written value is unique.
        values: Option<u64>,
        /// Percentage of writes and cas that end `info` (before or after taking effect).
        info: u64,
    }

    /// Simulates clients doing operations on registers, each taking effect at one instant
    /// between its invocation and its completion (or, for info ops, at any later instant or
    /// never). Returns the history, in which the last invocations may have no completion.
    fn simulate(seed: u64, sim: &Sim) -> Vec<Op> {
        let Sim {
            processes,
            keys,
            ops: n_ops,
            values,
            info,
        } = *sim;
        let mut rng = Rng(seed);
        let mut h = H::default();
        let mut time = 0u64;
        let mut regs: HashMap<i64, State> = HashMap::new();
        let mut ids: Vec<u64> = (0..processes).collect();
        let mut flights: Vec<Option<InFlight>> = (0..processes).map(|_| None).collect();
        let mut ghosts: Vec<(i64, Action)> = Vec::new();
        let mut next_value = 1i64;
        let mut invoked = 0;

        fn apply(regs: &mut HashMap<i64, State>, key: i64, action: Action) -> (State, bool) {
            let cur = regs.get(&key).copied().flatten();
            match action.step(cur) {
                Some(new) => {
                    regs.insert(key, new);
                    (cur, true)
                }
                None => (cur, false),
            }
        }

        while invoked < n_ops {
            time += 1 + rng.below(1_000_000);
            if !ghosts.is_empty() && rng.chance(3) {
                let (key, action) = ghosts.swap_remove(rng.below(ghosts.len() as u64) as usize);
                apply(&mut regs, key, action);
                continue;
            }
            let slot = rng.below(processes) as usize;
            let p = ids[slot];
            let flight = &mut flights[slot];
            match flight {
                None => {
                    let key = rng.below(keys as u64) as i64;
                    let fresh = |rng: &mut Rng, next_value: &mut i64| match values {
                        Some(d) => rng.below(d) as i64,
                        None => {
                            *next_value += 1;
                            *next_value
                        }
                    };
                    let action = match rng.below(10) {
                        0..=3 => Action::Read(None),
                        4..=7 => Action::Write(fresh(&mut rng, &mut next_value)),
                        _ => {
                            let to = fresh(&mut rng, &mut next_value);
                            let cur = regs.get(&key).copied().flatten();
                            let from = match cur {
                                Some(c) if rng.chance(70) => c,
                                _ => rng.below(values.unwrap_or(next_value as u64)) as i64,
                            };
                            Action::Cas(Some(from), to)
                        }
                    };
                    let value = match action {
                        Action::Read(_) => json!([key, null]),
                        Action::Write(v) => json!([key, v]),
                        Action::Cas(from, to) => json!([key, [from, to]]),
                    };
                    h.ev("invoke", p, action.f(), value);
                    *flight = Some(InFlight {
                        key,
                        action,
                        result: None,
                    });
                    invoked += 1;
                }
                Some(fl) if fl.result.is_none() => {
                    if !matches!(fl.action, Action::Read(_)) && rng.chance(info / 2) {
                        // Times out before taking effect; may still take effect later.
                        h.ev("info", p, fl.action.f(), info_value(fl));
                        if rng.chance(50) {
                            ghosts.push((fl.key, fl.action));
                        }
                        *flight = None;
                        ids[slot] += processes;
                    } else {
                        fl.result = Some(apply(&mut regs, fl.key, fl.action));
                    }
                }
                Some(fl) => {
                    let (seen, applied) = fl.result.unwrap();
                    let (kind, value) = match fl.action {
                        Action::Read(_) => {
                            let kind = if rng.chance(3) { "info" } else { "ok" };
                            (kind, json!([fl.key, seen]))
                        }
                        _ if !applied => ("fail", info_value(fl)),
                        _ if rng.chance(info / 2) => ("info", info_value(fl)),
                        _ => ("ok", info_value(fl)),
                    };
                    h.ev(kind, p, fl.action.f(), value);
                    if kind == "info" {
                        ids[slot] += processes;
                    }
                    *flight = None;
                }
            }
            h.ops.last_mut().unwrap().time = time;
        }
        // Operations still in flight are left without completion.
        h.ops
    }

    fn info_value(fl: &InFlight) -> Value {
        match fl.action {
            Action::Read(_) => json!([fl.key, null]),
            Action::Write(v) => json!([fl.key, v]),
            Action::Cas(from, to) => json!([fl.key, [from, to]]),
        }
    }

    /// Makes one ok read return a value that is provably impossible: a value `x` written (ok) by
    /// W1 where another ok write or cas W2 started after W1 completed and completed before the
    /// read started. Values are unique, so nothing else could have restored `x`. Returns the key.
    fn corrupt(history: &mut [Op]) -> Option<i64> {
        struct Done {
            key: i64,
            value: i64,
            call: usize,
            ret: usize,
        }
        let mut invokes: HashMap<u64, usize> = HashMap::new();
        let mut writes: Vec<Done> = Vec::new();
        let mut reads: Vec<(i64, usize, usize)> = Vec::new(); // key, call, ok index
        for (i, op) in history.iter().enumerate() {
            if op.kind == "invoke" {
                invokes.insert(op.process, i);
                continue;
            }
            let Some(call) = invokes.remove(&op.process) else {
                continue;
            };
            if op.kind != "ok" {
                continue;
            }
            let key = op.value[0].as_i64().unwrap();
            match op.f.as_str() {
                "read" => reads.push((key, call, i)),
                "write" => writes.push(Done {
                    key,
                    value: op.value[1].as_i64().unwrap(),
                    call,
                    ret: i,
                }),
                _ => writes.push(Done {
                    key,
                    value: op.value[1][1].as_i64().unwrap(),
                    call,
                    ret: i,
                }),
            }
        }
        for &(key, call, ok) in reads.iter().rev() {
            for w2 in writes.iter().filter(|w| w.key == key && w.ret < call) {
                if let Some(w1) = writes.iter().find(|w| w.key == key && w.ret < w2.call) {
                    assert_ne!(history[ok].value[1], json!(w1.value));
                    history[ok].value = json!([key, w1.value]);
                    return Some(key);
                }
            }
        }
        None
    }

    #[test]
    fn randomized_linearizable_histories_pass_and_corruptions_are_caught() {
        for seed in 0..30 {
            let sim = Sim {
                processes: 5,
                keys: 3,
                ops: 300,
                values: None,
                info: 10,
            };
            let mut history = simulate(seed, &sim);
            let a = check(&history);
            assert!(a.is_empty(), "seed {seed}: {a:#?}");

            let key = corrupt(&mut history).expect("a corruptible read");
            let a = check(&history);
            assert_eq!(a.len(), 1, "seed {seed}: {a:#?}");
            assert!(
                a[0].starts_with(&format!("key {key}: not linearizable")),
                "seed {seed}: {}",
                a[0]
            );
        }
    }

    /// Exhaustive search over every order of every subset of the optional operations.
    fn brute_force(ops: &[RegOp]) -> bool {
        fn go(ops: &[RegOp], placed: &mut Vec<bool>, state: State) -> bool {
            if ops
                .iter()
                .zip(placed.iter())
                .all(|(o, &p)| p || o.ret.is_none())
            {
                return true;
            }
            for i in 0..ops.len() {
                if placed[i] {
                    continue;
                }
                // Every required operation that completed before this one started goes first.
                let ready = ops
                    .iter()
                    .zip(placed.iter())
                    .all(|(o, &p)| p || o.ret.is_none_or(|r| r > ops[i].call));
                if !ready {
                    continue;
                }
                if let Some(next) = ops[i].action.step(state) {
                    placed[i] = true;
                    if go(ops, placed, next) {
                        return true;
                    }
                    placed[i] = false;
                }
            }
            false
        }
        go(ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng(7);
        let (mut good, mut bad) = (0, 0);
        for case in 0..5000 {
            // Each operation gets its own process and a random [call, return] interval.
            let n = 2 + rng.below(6);
            let mut events: Vec<(u64, Op)> = Vec::new();
            for p in 0..n {
                let call = rng.below(20);
                let ret = call + 1 + rng.below(8);
                let (f, inv, done) = match rng.below(3) {
                    0 => {
                        let v = match rng.below(4) {
                            0 => json!(null),
                            v => json!(v),
                        };
                        ("read", json!([0, null]), json!([0, v]))
                    }
                    1 => {
                        let v = json!([0, 1 + rng.below(3)]);
                        ("write", v.clone(), v)
                    }
                    _ => {
                        let v = json!([0, [1 + rng.below(3), 1 + rng.below(3)]]);
                        ("cas", v.clone(), v)
                    }
                };
                let kind = match rng.below(10) {
                    0 => "info",
                    1 => "fail",
                    2 => "none",
                    _ => "ok",
                };
                let op = |kind: &str, value: Value| Op {
                    kind: kind.to_string(),
                    process: p,
                    f: f.to_string(),
                    value,
                    time: 0,
                };
                events.push((2 * call, op("invoke", inv)));
                if kind != "none" {
                    events.push((2 * ret + 1, op(kind, done)));
                }
            }
            events.sort_by_key(|e| e.0);
            let history: Vec<Op> = events
                .into_iter()
                .map(|(t, mut op)| {
                    op.time = t * 1_000_000;
                    op
                })
                .collect();
            let (by_key, shape) = parse(&history);
            assert!(shape.is_empty(), "{shape:?}");
            let ops = by_key.get(&0).cloned().unwrap_or_default();
            let expected = brute_force(&ops);
            let a = check(&history);
            assert_eq!(a.is_empty(), expected, "case {case}: {a:?}\n{history:#?}");
            if expected {
                good += 1;
            } else {
                bad += 1;
            }
        }
        assert!(good > 500 && bad > 500, "good {good}, bad {bad}");
    }

    #[test]
    fn five_hundred_ops_on_one_key_with_eight_processes_is_fast() {
        for seed in 100..103 {
            let sim = Sim {
                processes: 8,
                keys: 1,
                ops: 500,
                values: None,
                info: 10,
            };
            let mut history = simulate(seed, &sim);
            let start = Instant::now();
            let a = check(&history);
            let ok_time = start.elapsed();
            assert!(a.is_empty(), "seed {seed}: {a:#?}");

            corrupt(&mut history).expect("a corruptible read");
            let start = Instant::now();
            let a = check(&history);
            let bad_time = start.elapsed();
            assert_eq!(a.len(), 1, "seed {seed}: {a:#?}");
            assert!(a[0].starts_with("key 0: not linearizable"), "{}", a[0]);
            eprintln!("seed {seed}: linearizable in {ok_time:?}, corrupted in {bad_time:?}");
            assert!(ok_time.as_secs_f64() < 5.0, "{ok_time:?}");
            assert!(bad_time.as_secs_f64() < 5.0, "{bad_time:?}");
        }
    }

    #[test]
    fn few_distinct_values_and_many_info_ops_are_fast() {
        // Like the real workload: values 0..5, so many writes and cas collide; lots of timeouts.
        for (seed, info) in [(200, 10), (201, 30), (202, 50)] {
            let sim = Sim {
                processes: 8,
                keys: 1,
                ops: 500,
                values: Some(5),
                info,
            };
            let history = simulate(seed, &sim);
            let start = Instant::now();
            let a = check(&history);
            let elapsed = start.elapsed();
            assert!(a.is_empty(), "seed {seed}: {a:#?}");
            eprintln!("seed {seed} ({info}% info): linearizable in {elapsed:?}");
            assert!(elapsed.as_secs_f64() < 5.0, "{elapsed:?}");
        }
    }
}
