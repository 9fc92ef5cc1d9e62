//! The leader-side SQL gate: parses each statement with PostgreSQL's own grammar (libpg_query)
//! and refuses, before anything enters the log, what cannot be replicated as a statement.
//!
//! Owns the rules of what SQL a log entry may carry (design.md invariant 2 and "Traps we know
//! about") and what SQL a read may run (invariant 4). Every refusal says why and what to do
//! instead. This is the first layer; `docs/determinism.md` lists the classes. Runs only on the
//! leader (and on the receiving node for reads); followers apply what the log says.

use pg_query::NodeEnum;

use crate::sql::{catalog, session_rules, time_literals};

use super::refusal::refuse;
pub use super::refusal::Refusal;

const SYNTAX_ERROR: &str = "42601";
const FEATURE_NOT_SUPPORTED: &str = "0A000";
const INSUFFICIENT_PRIVILEGE: &str = "42501";
const READ_ONLY: &str = "25006";

/// Parses `sql` and returns its single statement.
fn parse_one(sql: &str) -> Result<NodeEnum, Refusal> {
    first_statement(parse(sql)?.0)
}

fn first_statement(parsed: pg_query::ParseResult) -> Result<NodeEnum, Refusal> {
    parsed
        .protobuf
        .stmts
        .into_iter()
        .next()
        .and_then(|raw| raw.stmt)
        .and_then(|node| node.node)
        .ok_or_else(|| refuse(SYNTAX_ERROR, "empty statement"))
}

/// Parses `sql`, requiring exactly one statement that does not touch raftpg's own schema.
/// Also returns the complete tree in its serde form (see [`walk`]), computed once per statement.
/// Parses `sql` (any number of statements) into its tree and the tree's serde form.
fn parse_any(sql: &str) -> Result<(pg_query::ParseResult, serde_json::Value), Refusal> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| refuse(SYNTAX_ERROR, e.to_string()))?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| {
        refuse(
            FEATURE_NOT_SUPPORTED,
            format!("cannot inspect the statement: {e}"),
        )
    })?;
    Ok((parsed, tree))
}

fn parse(sql: &str) -> Result<(pg_query::ParseResult, serde_json::Value), Refusal> {
    let parsed = pg_query::parse(sql, 0).map_err(|e| match e {
        pg_query::Error::Parse(m) => refuse(SYNTAX_ERROR, m),
        other => refuse(SYNTAX_ERROR, other.to_string()),
    })?;
    if parsed.protobuf.stmts.len() != 1 {
        return Err(refuse(
            SYNTAX_ERROR,
            format!(
                "each statement must hold exactly one SQL command (found {}); send several statements in one request to run them atomically",
                parsed.protobuf.stmts.len()
            ),
        ));
    }
    // The complete tree in its serde form (pg_query's own iterators skip parts of it).
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| {
        refuse(
            FEATURE_NOT_SUPPORTED,
            format!("cannot inspect the statement: {e}"),
        )
    })?;
    // Refuse any reference to raftpg's own bookkeeping (schema, tables, functions, roles):
    // raftpg.applied must only change with the log position.
    check_raftpg_names(&tree)?;
    Ok((parsed, tree))
}

/// raftpg's own schema and roles: no statement may name them (design.md "Errors outside a
/// statement": raftpg's schema, tables, role and settings must be out of reach of writes).
const RAFTPG_SCHEMA: &str = "raftpg";
const RAFTPG_ROLES: &[&str] = &["raftpg", "raftpg_reader"];

/// The functions of schema `raftpg` that statements may call: the deterministic clock and
/// random generators (see `apply::state_machine::DETERMINISTIC_FUNCTIONS_SQL`).
const RAFTPG_CALLABLE: &[&str] = &[
    "now",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "random",
    "gen_random_uuid",
];

fn raftpg_reference() -> Refusal {
    refuse(
        INSUFFICIENT_PRIVILEGE,
        "the schema raftpg and the roles raftpg and raftpg_reader hold raftpg's own bookkeeping and cannot be used by statements (only raftpg.now(), raftpg.random(), raftpg.gen_random_uuid() and the raftpg.current_*/local* clock functions may be called)",
    )
}

/// Refuses any name of raftpg's schema or roles anywhere in a statement: a relation
/// (`raftpg.applied`), a schema (`DROP SCHEMA raftpg`, `SET SCHEMA raftpg`, `GRANT ... ON
/// SCHEMA raftpg`), a qualified function/type/object name, a role (`GRANT ... TO raftpg`,
/// `OWNER TO raftpg`), a `search_path` naming it, or a string naming an object in it
/// (`'raftpg.applied'::regclass`). Calls of [`RAFTPG_CALLABLE`] functions are allowed.
fn check_raftpg_names(tree: &serde_json::Value) -> Result<(), Refusal> {
    fn visit(v: &serde_json::Value, inside_set: bool) -> Result<(), Refusal> {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    match (k.as_str(), child) {
                        (
                            "schemaname" | "newschema" | "subname" | "newname",
                            serde_json::Value::String(s),
                        ) if s == RAFTPG_SCHEMA => return Err(raftpg_reference()),
                        ("rolename", serde_json::Value::String(s))
                            if RAFTPG_ROLES.contains(&s.as_str()) =>
                        {
                            return Err(raftpg_reference())
                        }
                        ("String", serde_json::Value::Object(s))
                            if s.get("sval").and_then(|x| x.as_str()) == Some(RAFTPG_SCHEMA) =>
                        {
                            return Err(raftpg_reference())
                        }
                        ("sval", serde_json::Value::String(s)) => {
                            let lower = s.to_ascii_lowercase();
                            // A string naming an object in schema raftpg, or a search_path
                            // that includes it.
                            // ("$user" is the applier's role, raftpg: its schema.)
                            if lower.starts_with("raftpg.")
                                || (inside_set
                                    && lower
                                        .split([',', ' ', '"'])
                                        .any(|p| p == RAFTPG_SCHEMA || p == "$user"))
                            {
                                return Err(raftpg_reference());
                            }
                        }
                        ("FuncCall", serde_json::Value::Object(call)) => {
                            let (schema, name) = func_name(child);
                            let callable = schema.as_deref() == Some(RAFTPG_SCHEMA)
                                && RAFTPG_CALLABLE.contains(&name.as_str());
                            for (ck, cv) in call {
                                if callable && ck == "funcname" {
                                    continue;
                                }
                                visit(cv, inside_set)?;
                            }
                            continue;
                        }
                        ("VariableSetStmt", _) => {
                            visit(child, true)?;
                            continue;
                        }
                        _ => {}
                    }
                    visit(child, inside_set)?;
                }
                Ok(())
            }
            serde_json::Value::Array(a) => a.iter().try_for_each(|c| visit(c, inside_set)),
            _ => Ok(()),
        }
    }
    visit(tree, false)
}

/// Whether a statement is DML (its literals are typed by the statement itself, at each
/// execution) rather than DDL or a utility command.
fn is_dml_statement(stmt: &NodeEnum) -> bool {
    matches!(
        stmt,
        NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::SelectStmt(_)
            | NodeEnum::MergeStmt(_)
    )
}

/// A string constant of the tree with its location, and the date/time cast it is the direct
/// argument of, if any: `(value, location, cast)`, where `cast` is `(type name, is array,
/// type location)`.
type StringConst<'a> = (&'a str, usize, Option<(String, bool, usize)>);

/// Collects every string constant of the tree (see [`StringConst`]).
fn string_constants(tree: &serde_json::Value) -> Vec<StringConst<'_>> {
    fn aconst(v: &serde_json::Value) -> Option<(&str, usize)> {
        let c = v.pointer("/node/AConst")?;
        let s = c.pointer("/val/Sval/sval")?.as_str()?;
        Some((s, location(c)?))
    }
    fn visit<'a>(v: &'a serde_json::Value, out: &mut Vec<StringConst<'a>>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    if k == "TypeCast" {
                        if let Some((s, loc)) = child.get("arg").and_then(aconst) {
                            let tn = child.get("type_name");
                            let names: Vec<String> = tn
                                .and_then(|t| t.get("names"))
                                .and_then(|n| n.as_array())
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|n| n.pointer("/node/String/sval"))
                                        .filter_map(|s| s.as_str())
                                        .map(|s| s.to_ascii_lowercase())
                                        .collect()
                                })
                                .unwrap_or_default();
                            let qualified_ok =
                                names.len() == 1 || (names.len() == 2 && names[0] == "pg_catalog");
                            let name = if qualified_ok {
                                names.last().cloned().unwrap_or_default()
                            } else {
                                String::new()
                            };
                            let is_array = tn
                                .and_then(|t| t.get("array_bounds"))
                                .and_then(|a| a.as_array())
                                .is_some_and(|a| !a.is_empty());
                            let type_loc = tn.and_then(location).unwrap_or(usize::MAX);
                            out.push((s, loc, Some((name, is_array, type_loc))));
                            if let Some(t) = tn {
                                visit(t, out);
                            }
                            continue;
                        }
                    }
                    if k == "AConst" {
                        if let (Some(s), Some(loc)) = (
                            child.pointer("/val/Sval/sval").and_then(|s| s.as_str()),
                            location(child),
                        ) {
                            out.push((s, loc, None));
                        }
                    }
                    visit(child, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|c| visit(c, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    visit(tree, &mut out);
    out
}

/// Functions rewritten at the leader to raftpg's deterministic versions (installed by the
/// applier in schema `raftpg`; they read the entry's timestamp and seed).
const REWRITTEN_FUNCTIONS: &[(&str, &str)] = &[
    ("now", "raftpg.now"),
    ("transaction_timestamp", "raftpg.now"),
    ("statement_timestamp", "raftpg.now"),
    ("clock_timestamp", "raftpg.now"),
    ("random", "raftpg.random"),
    ("gen_random_uuid", "raftpg.gen_random_uuid"),
    ("uuid_generate_v4", "raftpg.gen_random_uuid"),
];

/// Functions that give each row a different value: where rows are visited in physical order
/// (UPDATE, DELETE, INSERT ... SELECT without ORDER BY), nodes would disagree on which row got
/// which value.
const PER_ROW_FUNCTIONS: &[&str] = &["random", "gen_random_uuid", "uuid_generate_v4", "nextval"];

/// `CURRENT_TIMESTAMP`-style keywords (SQLValueFunction ops) and their replacement; `None`
/// marks the precision variants, which are refused.
fn sql_value_function_rewrite(op: i32) -> Option<Option<&'static str>> {
    use pg_query::protobuf::SqlValueFunctionOp as Op;
    match Op::try_from(op).ok()? {
        Op::SvfopCurrentTimestamp => Some(Some("raftpg.now()")),
        Op::SvfopCurrentDate => Some(Some("raftpg.current_date()")),
        Op::SvfopCurrentTime => Some(Some("raftpg.current_time()")),
        Op::SvfopLocaltime => Some(Some("raftpg.localtime()")),
        Op::SvfopLocaltimestamp => Some(Some("raftpg.localtimestamp()")),
        Op::SvfopCurrentTimeN
        | Op::SvfopCurrentTimestampN
        | Op::SvfopLocaltimeN
        | Op::SvfopLocaltimestampN => Some(None),
        _ => None,
    }
}

/// Visits every object of a serialized parse tree with the key it appears under (node kinds
/// appear as keys, e.g. `"FuncCall": {...}`).
fn walk<'a>(v: &'a serde_json::Value, f: &mut impl FnMut(&'a str, &'a serde_json::Value)) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                if child.is_object() {
                    f(k, child);
                }
                walk(child, f);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| walk(c, f)),
        _ => {}
    }
}

fn location(node: &serde_json::Value) -> Option<usize> {
    node.get("location")
        .and_then(|l| l.as_i64())
        .and_then(|l| usize::try_from(l).ok())
}

/// (schema, name) of a serialized FuncCall, lowercased.
fn func_name(node: &serde_json::Value) -> (Option<String>, String) {
    let parts: Vec<String> = node
        .get("funcname")
        .and_then(|f| f.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|n| n.pointer("/node/String/sval").and_then(|s| s.as_str()))
                .map(|s| s.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let last = parts.last().cloned().unwrap_or_default();
    let schema = if parts.len() > 1 {
        Some(parts[0].clone())
    } else {
        None
    };
    (schema, last)
}

/// The number of arguments of a serialized FuncCall (`count(*)`: none).
fn arity(node: &serde_json::Value) -> usize {
    node.get("args")
        .and_then(|a| a.as_array())
        .map(|a| a.len())
        .unwrap_or(0)
}

/// The [`catalog`] verdict of a call of `schema.name` with `arity` arguments: unqualified,
/// `pg_catalog.` and `information_schema.` calls are resolved among PostgreSQL's functions and
/// the allowed extensions' functions, calls qualified with another schema among the
/// extensions' (which may live in any schema). `None`: raftpg's own schema, or a function of
/// the user's.
fn call_verdict(
    schema: Option<&str>,
    name: &str,
    arity: usize,
) -> Option<(catalog::Verdict, &'static str)> {
    match schema {
        Some(RAFTPG_SCHEMA) => None,
        None | Some("pg_catalog" | "information_schema") => catalog::lookup(name, arity, true),
        Some(_) => catalog::lookup(name, arity, false),
    }
}

/// Why a write may not call `name()` (see [`catalog::Verdict`]), and what to do instead.
fn write_refusal(name: &str, verdict: catalog::Verdict, why: &str) -> Refusal {
    use catalog::Verdict as V;
    match verdict {
        V::PerNode => refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() depends on {why}, which differs between nodes, so a write cannot use it; call it in a read, or compute the value in the client and bind it as a parameter"),
        ),
        V::Session => refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() {why}, and a write runs in the applier session every write shares; use a row as a lock (SELECT ... FOR UPDATE is implicit in UPDATE) or compute the value in the client"),
        ),
        V::Escape => refuse(
            INSUFFICIENT_PRIVILEGE,
            format!("{name}() is not allowed: it {why}, which raftpg cannot check"),
        ),
        V::Internal => refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() is {why}; use the cast or operator that calls it"),
        ),
        _ => refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() is not immutable and raftpg has not reviewed that it gives the same result on every node, so writes may not call it; compute the value in the client (or in a read) and bind it as a parameter"),
        ),
    }
}

/// Why a read may not call `name()` (a [`catalog::Verdict::Session`] or `Escape` function).
fn read_refusal(name: &str, verdict: catalog::Verdict, why: &str) -> Refusal {
    match verdict {
        catalog::Verdict::Escape => refuse(
            INSUFFICIENT_PRIVILEGE,
            format!("{name}() is not allowed: it {why}, which raftpg cannot check"),
        ),
        _ => refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() {why}, and a read runs on a pooled connection that later reads of every client share, so it may not leave state behind; use a row as a lock in a write, or keep such state in the client"),
        ),
    }
}

/// Functions a statement running as a role must not call: `set_config` can set
/// `session_authorization` or `role` (back to raftpg's, see `apply::applier`, "Roles"), and the
/// others run SQL given as text, which no check here can see.
pub const ROLE_ESCAPES: &[&str] = &[
    "set_config",
    "query_to_xml",
    "query_to_xml_and_xmlschema",
    "query_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
];

/// Refuses calls of [`ROLE_ESCAPES`] anywhere in a statement (reads and writes).
fn check_role_escapes(tree: &serde_json::Value) -> Result<(), Refusal> {
    fn visit(v: &serde_json::Value) -> Result<(), Refusal> {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    if k == "FuncCall" {
                        let (_, name) = func_name(child);
                        if ROLE_ESCAPES.contains(&name.as_str()) {
                            return Err(refuse(
                                INSUFFICIENT_PRIVILEGE,
                                format!("{name}() is not allowed: a statement runs as its role, and {name}() could change the role or run SQL given as text, which raftpg cannot check"),
                            ));
                        }
                    }
                    visit(child)?;
                }
                Ok(())
            }
            serde_json::Value::Array(a) => a.iter().try_for_each(visit),
            _ => Ok(()),
        }
    }
    visit(tree)
}

/// A text edit: replace bytes `start..end` of the statement.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// A call of one of [`REWRITTEN_FUNCTIONS`] found in the tree.
struct FuncRewrite {
    /// Where the (possibly schema-qualified) function name starts.
    loc: usize,
    /// How many dotted identifiers the name spans (`now` 1, `pg_catalog.now` 2).
    parts: usize,
    /// The replacement name.
    to: &'static str,
}

/// A time string (`'now'`, `'today'`, ...) cast to a date/time type in DML.
struct LiteralRewrite {
    /// Where the string literal starts.
    loc: usize,
    /// The deterministic expression that replaces it.
    expr: &'static str,
    /// Where its type name starts when written before it (`timestamptz 'now'`).
    type_before: Option<usize>,
}

/// What one walk over a write's parse tree found: the rewrites it needs and whether it calls a
/// function that gives each row a different value.
#[derive(Default)]
struct TreeScan {
    /// Calls to rename (see [`REWRITTEN_FUNCTIONS`]).
    funcs: Vec<FuncRewrite>,
    /// `CURRENT_TIMESTAMP`-style keywords to replace; zero-length edits at the keyword's
    /// location, widened to the keyword's token once the statement is scanned.
    keywords: Vec<Edit>,
    /// A [`PER_ROW_FUNCTIONS`] call appears somewhere.
    per_row_calls: bool,
    /// Locations of `tableoid` columns cast to `regclass` (see [`note_tableoid_as_name`]).
    tableoid_as_name: Vec<usize>,
}

/// Checks one statement of a write entry and returns it rewritten for deterministic replay:
/// time and randomness functions (also in DEFAULT expressions and SQL function bodies parsed
/// by PostgreSQL) become raftpg's versions, driven by the entry's timestamp and seed.
/// Everything else in the text is left byte for byte as the client sent it.
pub fn prepare_write(sql: &str) -> Result<String, Refusal> {
    // pg_query's own node iterator skips parts of the tree (e.g. VALUES lists), so walk the
    // complete tree through its serde form: every node of every statement is visited.
    let (parsed, tree) = parse(sql)?;
    check_role_escapes(&tree)?;
    let stmt = statement_of(&parsed)?;
    let dml = is_dml_statement(stmt);
    let scan = scan_write_tree(&tree, dml)?;
    let literals = time_literal_rewrites(&tree, dml)?;
    check_statement_kind(stmt)?;
    check_extension_allowed(stmt)?;
    check_row_order(stmt, scan.per_row_calls)?;
    check_function_bodies(stmt)?;
    if let Some(rewritten) = super::roles::prepare(sql, stmt)? {
        return Ok(rewritten);
    }
    if scan.funcs.is_empty() && scan.keywords.is_empty() && literals.is_empty() {
        return Ok(sql.to_string());
    }
    apply_rewrites(sql, scan, literals)
}

/// The single statement of a parse result, borrowed (see [`first_statement`]).
fn statement_of(parsed: &pg_query::ParseResult) -> Result<&NodeEnum, Refusal> {
    parsed
        .protobuf
        .stmts
        .first()
        .and_then(|raw| raw.stmt.as_ref())
        .and_then(|node| node.node.as_ref())
        .ok_or_else(|| refuse(SYNTAX_ERROR, "empty statement"))
}

/// Walks every node of a write's tree (see [`walk`]): refuses, at the first node that needs
/// it, what would diverge between nodes, and collects the rewrites of time and randomness
/// calls.
fn scan_write_tree(tree: &serde_json::Value, dml: bool) -> Result<TreeScan, Refusal> {
    let mut scan = TreeScan::default();
    let mut refusal: Option<Refusal> = None;
    walk(tree, &mut |kind, node| {
        if refusal.is_none() {
            refusal = scan_node(kind, node, dml, &mut scan).err();
        }
    });
    match refusal {
        Some(r) => Err(r),
        None => Ok(scan),
    }
}

/// One node of [`scan_write_tree`], by its kind.
fn scan_node(
    kind: &str,
    node: &serde_json::Value,
    dml: bool,
    scan: &mut TreeScan,
) -> Result<(), Refusal> {
    match kind {
        "VariableSetStmt" => check_variable_set(node),
        "FuncCall" => scan_func_call(node, dml, scan),
        "SqlvalueFunction" => scan_sql_value_function(node, scan),
        "DefElem" if node.get("defname").and_then(|d| d.as_str()) == Some("cache") => {
            check_sequence_cache(node)
        }
        "RangeTableSample" => Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "TABLESAMPLE picks rows by physical page (SYSTEM) or at random (BERNOULLI), which differs between nodes, also with REPEATABLE; select the rows by a key instead (e.g. WHERE hashtext(id::text) % 20 = 0)",
        )),
        "SelectStmt" | "larg" | "rarg" => check_limit_is_ordered(node),
        "TypeCast" => {
            note_tableoid_as_name(node, scan);
            Ok(())
        }
        "ColumnRef" => check_system_column(node, scan),
        "RangeVar" => check_system_relation(node),
        _ => Ok(()),
    }
}

/// A write may read only the system relations of [`catalog::RELATIONS_ALLOWED`].
fn check_system_relation(node: &serde_json::Value) -> Result<(), Refusal> {
    let lower = |k: &str| {
        node.get(k)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(|v| v.to_ascii_lowercase())
    };
    let Some(rel) = lower("relname") else {
        return Ok(());
    };
    match catalog::relation_refused(lower("schemaname").as_deref(), &rel) {
        Some(name) => Err(system_relation_refusal(&name)),
        None => Ok(()),
    }
}

fn system_relation_refusal(name: &str) -> Refusal {
    refuse(
        FEATURE_NOT_SUPPORTED,
        format!("a write may not read {name}: its rows hold object ids, sizes, statistics, settings or other values that differ between nodes; read it with the read API, or use pg_tables, pg_views, pg_indexes, pg_sequences or information_schema.tables/columns for names and definitions"),
    )
}

/// System columns whose values are per node: a physical row address, transaction and command
/// ids of the node's own transactions.
const PER_NODE_SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax"];

/// The last field of a serialized ColumnRef (`t.ctid` → `ctid`), lower case.
fn column_ref_field(node: &serde_json::Value) -> Option<String> {
    node.get("fields")?
        .as_array()?
        .last()?
        .pointer("/node/String/sval")?
        .as_str()
        .map(|s| s.to_ascii_lowercase())
}

/// `tableoid::regclass` names the row's table (by name, the same on every node): the one use
/// of `tableoid` a write may make. Notes where such a ColumnRef is.
fn note_tableoid_as_name(node: &serde_json::Value, scan: &mut TreeScan) {
    let to_regclass = node
        .pointer("/type_name/names")
        .and_then(|n| n.as_array())
        .and_then(|a| a.last())
        .and_then(|n| n.pointer("/node/String/sval"))
        .and_then(|s| s.as_str())
        .is_some_and(|t| t.eq_ignore_ascii_case("regclass"));
    if let Some(col) = node.pointer("/arg/node/ColumnRef") {
        if to_regclass && column_ref_field(col).as_deref() == Some("tableoid") {
            scan.tableoid_as_name.extend(location(col));
        }
    }
}

/// Refuses the per-node system columns anywhere in a write (as values, in conditions — a
/// `WHERE ctid = …` picks a different row on each node — or in a view's definition), and
/// `tableoid` except as `tableoid::regclass`.
fn check_system_column(node: &serde_json::Value, scan: &TreeScan) -> Result<(), Refusal> {
    let Some(field) = column_ref_field(node) else {
        return Ok(());
    };
    if PER_NODE_SYSTEM_COLUMNS.contains(&field.as_str()) {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            format!("the system column {field} is a physical row address or a transaction id of each node's own PostgreSQL, which differ between nodes, so a write cannot use it; identify rows by a key (a primary key or a unique column)"),
        ));
    }
    if field == "tableoid" && !location(node).is_some_and(|l| scan.tableoid_as_name.contains(&l)) {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "the system column tableoid is an object id, which differs between nodes; a write may use it only as tableoid::regclass (the table's name)",
        ));
    }
    Ok(())
}

/// A function call: `currval()`/`lastval()` outside a query and functions whose
/// [`catalog`] verdict does not allow writes are refused, [`PER_ROW_FUNCTIONS`] noted,
/// [`REWRITTEN_FUNCTIONS`] collected for renaming. Functions of schema raftpg and the user's own
/// functions are left alone (their bodies were checked when they were created).
fn scan_func_call(node: &serde_json::Value, dml: bool, scan: &mut TreeScan) -> Result<(), Refusal> {
    let (schema, name) = func_name(node);
    if matches!(name.as_str(), "currval" | "lastval")
        && schema.as_deref().is_none_or(|s| s == "pg_catalog")
        && !dml
    {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            format!("{name}() outside a query depends on the applier session's history, which differs between nodes; call it in INSERT/UPDATE/DELETE/SELECT after nextval() in the same request, or use RETURNING"),
        ));
    }
    if PER_ROW_FUNCTIONS.contains(&name.as_str())
        && schema
            .as_deref()
            .is_none_or(|s| matches!(s, "pg_catalog" | "public" | "raftpg"))
    {
        scan.per_row_calls = true;
    }
    if let Some((verdict, why)) = call_verdict(schema.as_deref(), &name, arity(node)) {
        if !verdict.allowed_in_writes() {
            return Err(write_refusal(&name, verdict, why));
        }
    }
    if schema
        .as_deref()
        .is_some_and(|s| s != "pg_catalog" && s != "public")
    {
        return Ok(()); // e.g. raftpg.now(), or a user schema's own function
    }
    if let Some((_, to)) = REWRITTEN_FUNCTIONS.iter().find(|(from, _)| *from == name) {
        let parts = node
            .get("funcname")
            .and_then(|f| f.as_array())
            .map(|a| a.len())
            .unwrap_or(1);
        let loc = location(node).ok_or_else(|| cannot_rewrite(&name))?;
        scan.funcs.push(FuncRewrite { loc, parts, to });
    }
    Ok(())
}

/// A `CURRENT_TIMESTAMP`-style keyword: collected for replacement, or refused when written
/// with a precision.
fn scan_sql_value_function(node: &serde_json::Value, scan: &mut TreeScan) -> Result<(), Refusal> {
    let op = node.get("op").and_then(|o| o.as_i64()).unwrap_or(0) as i32;
    match sql_value_function_rewrite(op) {
        Some(Some(to)) => {
            let loc = location(node).ok_or_else(|| cannot_rewrite("CURRENT_TIMESTAMP"))?;
            scan.keywords.push(Edit {
                start: loc,
                end: loc,
                text: to.to_string(),
            });
            Ok(())
        }
        Some(None) => Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "CURRENT_TIMESTAMP(p)/LOCALTIMESTAMP(p)/CURRENT_TIME(p)/LOCALTIME(p) with a precision are not supported; use date_trunc(..., raftpg.now()) or the keyword without precision",
        )),
        None => Ok(()),
    }
}

/// A sequence's `CACHE` option: only 1 (or none) is allowed.
fn check_sequence_cache(node: &serde_json::Value) -> Result<(), Refusal> {
    let arg = node.pointer("/arg/node");
    let small = arg
        .and_then(|a| a.pointer("/Integer/ival"))
        .map(|v| v.as_i64().unwrap_or(0) <= 1)
        .unwrap_or(false);
    if arg.is_some() && !small {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "sequences with CACHE > 1 hand out different values on each node after a restart; use CACHE 1 (the default)",
        ));
    }
    Ok(())
}

/// A SELECT (or a branch of a set operation): LIMIT/OFFSET needs an ORDER BY.
fn check_limit_is_ordered(node: &serde_json::Value) -> Result<(), Refusal> {
    let has = |k: &str| node.get(k).is_some_and(|v| !v.is_null());
    let unsorted = node
        .get("sort_clause")
        .and_then(|v| v.as_array())
        .is_none_or(|a| a.is_empty());
    if (has("limit_count") || has("limit_offset")) && unsorted {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "LIMIT/OFFSET without ORDER BY picks rows in physical order, which differs between nodes; add an ORDER BY on a unique key",
        ));
    }
    Ok(())
}

/// Time hidden in strings (`'now'`, `'today'`, ...): rewritten where cast explicitly to a
/// date/time type in DML, refused anywhere else (see [`time_literals`]).
fn time_literal_rewrites(
    tree: &serde_json::Value,
    dml: bool,
) -> Result<Vec<LiteralRewrite>, Refusal> {
    let mut out = Vec::new();
    for (value, loc, cast) in string_constants(tree) {
        if !time_literals::is_time_string(value) {
            continue;
        }
        let rewrite = cast
            .as_ref()
            .filter(|_| dml)
            .and_then(|(ty, array, type_loc)| {
                time_literals::rewrite(value, ty, *array).map(|e| (e, *type_loc))
            });
        match rewrite {
            Some((expr, type_loc)) => out.push(LiteralRewrite {
                loc,
                expr,
                type_before: (type_loc < loc).then_some(type_loc),
            }),
            None => {
                return Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    time_literals::refusal_message(value),
                ))
            }
        }
    }
    Ok(out)
}

/// Turns the collected rewrites into byte ranges of `sql` (located with PostgreSQL's own
/// scanner) and applies them.
fn apply_rewrites(
    sql: &str,
    scan: TreeScan,
    literals: Vec<LiteralRewrite>,
) -> Result<String, Refusal> {
    let tokens = pg_query::scan(sql)
        .map_err(|e| refuse(SYNTAX_ERROR, e.to_string()))?
        .tokens;
    let mut edits = scan.keywords;
    for f in scan.funcs {
        edits.push(func_edit(&tokens, f)?);
    }
    for l in literals {
        edits.push(literal_edit(sql, &tokens, l)?);
    }
    for e in edits.iter_mut().filter(|e| e.start == e.end) {
        let tok = tokens
            .iter()
            .find(|t| t.start as usize == e.start)
            .ok_or_else(|| cannot_rewrite(&e.text))?;
        e.end = tok.end as usize;
    }
    splice(sql, edits)
}

/// The edit that renames a call: the name spans `parts` identifiers separated by dots.
fn func_edit(tokens: &[pg_query::protobuf::ScanToken], f: FuncRewrite) -> Result<Edit, Refusal> {
    let first = tokens
        .iter()
        .position(|t| t.start as usize == f.loc)
        .ok_or_else(|| cannot_rewrite(f.to))?;
    let last = tokens
        .get(first + 2 * (f.parts - 1))
        .ok_or_else(|| cannot_rewrite(f.to))?;
    Ok(Edit {
        start: f.loc,
        end: last.end as usize,
        text: f.to.to_string(),
    })
}

/// The edit that replaces a time string by its expression.
fn literal_edit(
    sql: &str,
    tokens: &[pg_query::protobuf::ScanToken],
    l: LiteralRewrite,
) -> Result<Edit, Refusal> {
    let literal = tokens
        .iter()
        .find(|t| t.start as usize == l.loc)
        .ok_or_else(|| cannot_rewrite(l.expr))?;
    let end = literal.end as usize;
    Ok(match l.type_before {
        // `timestamptz 'now'`: the whole typed literal becomes a CAST.
        Some(type_loc) => Edit {
            start: type_loc,
            end,
            text: format!(
                "CAST(({}) AS {})",
                l.expr,
                sql.get(type_loc..l.loc)
                    .ok_or_else(|| cannot_rewrite(l.expr))?
                    .trim()
            ),
        },
        None => Edit {
            start: l.loc,
            end,
            text: format!("({})", l.expr),
        },
    })
}

/// Applies non-overlapping edits to `sql`, last first so earlier offsets stay valid.
fn splice(sql: &str, mut edits: Vec<Edit>) -> Result<String, Refusal> {
    edits.sort_by_key(|e| std::cmp::Reverse(e.start));
    let mut out = sql.to_string();
    for e in edits {
        if e.end > out.len()
            || e.start > e.end
            || !out.is_char_boundary(e.start)
            || !out.is_char_boundary(e.end)
        {
            return Err(cannot_rewrite(&e.text));
        }
        out.replace_range(e.start..e.end, &e.text);
    }
    Ok(out)
}

/// A bounded memo of [`prepare_write`] (a pure function of the SQL text): parsing is the most
/// expensive part of accepting a write, and applications send the same statements again and
/// again. Holds at most `PREPARED_MAX` statements of at most `PREPARED_SQL_BYTES_MAX` bytes;
/// emptied when full.
#[derive(Default)]
pub struct PreparedWrites {
    memo: std::sync::Mutex<std::collections::HashMap<String, Result<String, Refusal>>>,
}

const PREPARED_MAX: usize = 1024;
const PREPARED_SQL_BYTES_MAX: usize = 4096;

impl PreparedWrites {
    /// [`prepare_write`], memoized — except statements that may hold a password (the memo
    /// would keep it, and every `CREATE ROLE` with it would get the same salt).
    pub fn prepare(&self, sql: &str) -> Result<String, Refusal> {
        if sql.len() > PREPARED_SQL_BYTES_MAX || contains_ignore_case(sql, "password") {
            return prepare_write(sql);
        }
        if let Some(hit) = self.memo.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return hit.clone();
        }
        let result = prepare_write(sql);
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        if memo.len() >= PREPARED_MAX {
            memo.clear();
        }
        memo.insert(sql.to_string(), result.clone());
        result
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn cannot_rewrite(what: &str) -> Refusal {
    refuse(
        FEATURE_NOT_SUPPORTED,
        format!("raftpg could not rewrite {what} in this statement for deterministic replay; bind the value as a parameter"),
    )
}

/// `VariableSetStmt` kinds (pg_query's protobuf numbering).
const VAR_SET_VALUE: i64 = 1;
const VAR_SET_DEFAULT: i64 = 2;
const VAR_RESET: i64 = 5;
const VAR_RESET_ALL: i64 = 6;

/// Checks a `SET` (a statement's `SET LOCAL`, or a function's `SET` clause) against the
/// settings a write may change (see `session_rules`). Whether a top-level `SET` is `LOCAL` is
/// checked by [`check_statement_kind`].
fn check_variable_set(node: &serde_json::Value) -> Result<(), Refusal> {
    let kind = node.get("kind").and_then(|k| k.as_i64()).unwrap_or(0);
    let name = node.get("name").and_then(|n| n.as_str()).unwrap_or("");
    match kind {
        VAR_SET_VALUE | VAR_SET_DEFAULT => match session_rules::set_local_refusal(name) {
            None => Ok(()),
            Some(why) => Err(refuse(FEATURE_NOT_SUPPORTED, why)),
        },
        // RESET is refused as session-level SET at the top level; in ALTER FUNCTION it only
        // removes a function's own setting.
        VAR_RESET | VAR_RESET_ALL => Ok(()),
        _ => Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "SET TRANSACTION, SET ... FROM CURRENT and similar forms are not allowed in a write: every write runs with the applier's fixed transaction settings",
        )),
    }
}

/// Procedural languages whose functions may read node-local state (files, environment,
/// network) or load code from node-local files.
fn node_local_language(lang: &str) -> bool {
    let lang = lang.to_ascii_lowercase();
    lang == "c" || lang == "internal" || (lang != "plpgsql" && lang.ends_with('u'))
}

/// The language named by `LANGUAGE x` among a CREATE FUNCTION's or DO's options.
fn language_of(options: &[pg_query::protobuf::Node]) -> Option<String> {
    options.iter().find_map(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == "language" => {
            match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                _ => None,
            }
        }
        _ => None,
    })
}

/// Statement classes that cannot be replicated as statements.
fn check_statement_kind(stmt: &NodeEnum) -> Result<(), Refusal> {
    let why: Option<&str> = match stmt {
        NodeEnum::TransactionStmt(_) => Some(
            "explicit transaction control (BEGIN/COMMIT/ROLLBACK/SAVEPOINT) is not allowed: every request already runs as one atomic transaction",
        ),
        NodeEnum::VariableSetStmt(s) if !s.is_local => {
            Some("session-level SET would leak into the shared applier session; use SET LOCAL inside the request")
        }
        NodeEnum::DiscardStmt(_) | NodeEnum::PrepareStmt(_) | NodeEnum::ExecuteStmt(_) | NodeEnum::DeallocateStmt(_) => {
            Some("session state (PREPARE/EXECUTE/DISCARD) is not replicated; send the statement itself with bound parameters")
        }
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => Some("LISTEN/UNLISTEN are session state and are not replicated"),
        NodeEnum::NotifyStmt(_) => Some("NOTIFY would signal listeners of every node's PostgreSQL at a different moment; notify from the application after the write is acknowledged"),
        NodeEnum::CreateEventTrigStmt(_) | NodeEnum::AlterEventTrigStmt(_) => {
            Some("event triggers run on raftpg's own maintenance of each node; they are not supported")
        }
        NodeEnum::CreateFdwStmt(_) | NodeEnum::AlterFdwStmt(_) | NodeEnum::CreateForeignServerStmt(_)
        | NodeEnum::AlterForeignServerStmt(_) | NodeEnum::CreateForeignTableStmt(_) | NodeEnum::ImportForeignSchemaStmt(_)
        | NodeEnum::CreateUserMappingStmt(_) | NodeEnum::AlterUserMappingStmt(_) => {
            Some("foreign data wrappers read data outside the replicated database, which differs between nodes")
        }
        NodeEnum::CreatePlangStmt(_) => Some("procedural languages are installed per node, not replicated"),
        NodeEnum::CreateFunctionStmt(f) if language_of(&f.options).is_some_and(|l| node_local_language(&l)) => {
            Some("functions in C, internal or untrusted languages can read node-local state; write functions in SQL or PL/pgSQL")
        }
        NodeEnum::DoStmt(d) if language_of(&d.args).is_some_and(|l| node_local_language(&l)) => {
            Some("DO blocks in untrusted languages can read node-local state; use PL/pgSQL")
        }
        NodeEnum::DeclareCursorStmt(_) | NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => {
            Some("cursors are session state; use a query through the read API")
        }
        NodeEnum::VacuumStmt(_) | NodeEnum::CheckPointStmt(_) => {
            Some("VACUUM/ANALYZE/CHECKPOINT are maintenance each node runs on its own, not replicated writes")
        }
        NodeEnum::CreatedbStmt(_) | NodeEnum::DropdbStmt(_) | NodeEnum::AlterDatabaseStmt(_) | NodeEnum::AlterDatabaseSetStmt(_) => {
            Some("databases are managed by raftpg; create schemas instead of databases")
        }
        NodeEnum::AlterSystemStmt(_) | NodeEnum::LoadStmt(_) => Some("node configuration is not replicated through SQL"),
        NodeEnum::CreateTableSpaceStmt(_) | NodeEnum::DropTableSpaceStmt(_) => {
            Some("tablespaces name node-local directories and are not supported")
        }
        NodeEnum::CopyStmt(_) => Some("COPY is not supported: send INSERT statements (several per request) instead"),
        NodeEnum::IndexStmt(s) if s.concurrent => Some("CREATE INDEX CONCURRENTLY cannot run in a transaction; use CREATE INDEX"),
        NodeEnum::ReindexStmt(_) => Some("REINDEX is node-local maintenance and is not replicated"),
        NodeEnum::ClusterStmt(_) => Some("CLUSTER is node-local maintenance and is not replicated"),
        NodeEnum::CreateStmt(s) if s.relation.as_ref().is_some_and(|r| r.relpersistence == "t") => {
            Some("temporary tables are session state; use a regular table")
        }
        NodeEnum::CreateTableAsStmt(s) if s.into.as_ref().and_then(|i| i.rel.as_ref()).is_some_and(|r| r.relpersistence == "t") => {
            Some("temporary tables are session state; use a regular table")
        }
        NodeEnum::SelectStmt(s) if s.into_clause.as_ref().and_then(|i| i.rel.as_ref()).is_some_and(|r| r.relpersistence == "t") => {
            Some("temporary tables are session state; use a regular table")
        }
        NodeEnum::CreateSubscriptionStmt(_) | NodeEnum::CreatePublicationStmt(_) | NodeEnum::AlterSubscriptionStmt(_) => {
            Some("logical replication objects are node-local")
        }
        _ => None,
    };
    match why {
        Some(m) => Err(refuse(FEATURE_NOT_SUPPORTED, m)),
        None => Ok(()),
    }
}

/// `CREATE EXTENSION` only of the extensions whose functions are classified
/// ([`catalog::EXTENSIONS_ALLOWED`]): any other could read per-node state through functions
/// the gate knows nothing about.
fn check_extension_allowed(stmt: &NodeEnum) -> Result<(), Refusal> {
    let NodeEnum::CreateExtensionStmt(e) = stmt else {
        return Ok(());
    };
    if catalog::EXTENSIONS_ALLOWED.contains(&e.extname.as_str()) {
        return Ok(());
    }
    Err(refuse(
        FEATURE_NOT_SUPPORTED,
        format!(
            "extension \"{}\" is not allowed: raftpg has not classified its functions, which could read state that differs between nodes; allowed: {}",
            e.extname,
            catalog::EXTENSIONS_ALLOWED.join(", ")
        ),
    ))
}

/// Writes whose result depends on the physical order of rows (which differs between nodes).
fn check_row_order(stmt: &NodeEnum, per_row_calls: bool) -> Result<(), Refusal> {
    match stmt {
        NodeEnum::InsertStmt(ins) => {
            if let Some(NodeEnum::SelectStmt(sel)) = ins.select_stmt.as_deref().and_then(|n| n.node.as_ref()) {
                let reads_rows = !sel.from_clause.is_empty() || sel.larg.is_some();
                if reads_rows && sel.sort_clause.is_empty() {
                    return Err(refuse(
                        FEATURE_NOT_SUPPORTED,
                        "INSERT ... SELECT without ORDER BY inserts rows in physical order, which differs between nodes (serial ids and defaults would differ); add an ORDER BY on a unique key",
                    ));
                }
            }
            Ok(())
        }
        NodeEnum::UpdateStmt(_) | NodeEnum::DeleteStmt(_) | NodeEnum::MergeStmt(_) if per_row_calls => Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "random()/gen_random_uuid()/nextval() in UPDATE, DELETE or MERGE are evaluated per row in physical order, which differs between nodes; compute the values in the client or derive them from the row (e.g. md5(id::text))",
        )),
        _ => Ok(()),
    }
}

/// Function bodies and DO blocks are strings PostgreSQL parses later: refuse bodies that call
/// per-node functions (raftpg's deterministic versions, `raftpg.now()` etc., are allowed).
fn check_function_bodies(stmt: &NodeEnum) -> Result<(), Refusal> {
    let options = match stmt {
        NodeEnum::CreateFunctionStmt(f) => &f.options,
        NodeEnum::DoStmt(d) => &d.args,
        _ => return Ok(()),
    };
    for opt in options {
        let Some(NodeEnum::DefElem(d)) = &opt.node else {
            continue;
        };
        if d.defname != "as" {
            continue;
        }
        let mut bodies = Vec::new();
        match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(NodeEnum::String(s)) => bodies.push(s.sval.clone()),
            Some(NodeEnum::List(l)) => {
                bodies.extend(l.items.iter().filter_map(|i| match &i.node {
                    Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                    _ => None,
                }))
            }
            _ => {}
        }
        for body in bodies {
            check_body(&body)?;
        }
    }
    Ok(())
}

fn check_body(body: &str) -> Result<(), Refusal> {
    let Ok(scanned) = pg_query::scan(body) else {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            "raftpg cannot read this function body to check that it is deterministic",
        ));
    };
    let tokens = scanned.tokens;
    let text = |i: usize| -> String {
        tokens
            .get(i)
            .and_then(|t| body.get(t.start as usize..t.end as usize))
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    for i in 0..tokens.len() {
        let word = text(i);
        let keyword_time = matches!(
            word.as_str(),
            "current_timestamp" | "current_date" | "current_time" | "localtime" | "localtimestamp"
        );
        let call = text(i + 1) == "(";
        let qualified_by_raftpg = i >= 2 && text(i - 1) == "." && text(i - 2) == "raftpg";
        if call {
            let schema = (i >= 2 && text(i - 1) == ".").then(|| text(i - 2));
            let args = body_call_arity(&text, i + 1, tokens.len());
            if let Some((verdict, why)) = call_verdict(schema.as_deref(), &word, args) {
                if !verdict.allowed_in_writes() {
                    let r = write_refusal(&word, verdict, why);
                    return Err(refuse(
                        r.sqlstate,
                        format!("the function body calls {}", r.message),
                    ));
                }
            }
        }
        if !call {
            let schema = (i >= 2 && text(i - 1) == ".").then(|| text(i - 2));
            if let Some(name) = catalog::relation_refused(schema.as_deref(), &word) {
                let r = system_relation_refusal(&name);
                return Err(refuse(
                    r.sqlstate,
                    format!("the function body: {}", r.message),
                ));
            }
            let as_name = word == "tableoid" && text(i + 1) == "::" && text(i + 2) == "regclass";
            if PER_NODE_SYSTEM_COLUMNS.contains(&word.as_str()) || (word == "tableoid" && !as_name)
            {
                return Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    format!("the function body uses the system column {word}, whose values differ between nodes; identify rows by a key"),
                ));
            }
        }
        let named = REWRITTEN_FUNCTIONS.iter().any(|(f, _)| *f == word);
        if keyword_time || (named && call && !qualified_by_raftpg) {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                format!(
                    "the function body uses {word}, which differs between nodes; functions must be deterministic: use raftpg.now(), raftpg.random() or raftpg.gen_random_uuid() inside function bodies"
                ),
            ));
        }
        if matches!(word.as_str(), "currval" | "lastval") && call {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                format!("the function body uses {word}(), which depends on the applier session's history; use the value nextval() returned"),
            ));
        }
        let statement_start = i == 0
            || matches!(
                text(i - 1).as_str(),
                ";" | "begin" | "then" | "else" | "loop" | "$$"
            );
        let next = text(i + 1);
        if (word == "set" && (statement_start || matches!(next.as_str(), "local" | "session")))
            || (word == "reset" && statement_start)
        {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                "SET LOCAL / SET SESSION / RESET inside a function body would change the applier's session for later writes; give the function a SET clause instead (CREATE FUNCTION ... SET work_mem = '64MB')",
            ));
        }
        if word == RAFTPG_SCHEMA && next == "." && !RAFTPG_CALLABLE.contains(&text(i + 2).as_str())
        {
            return Err(raftpg_reference());
        }
        if ROLE_ESCAPES.contains(&word.as_str()) && call {
            return Err(refuse(
                INSUFFICIENT_PRIVILEGE,
                format!("the function body calls {word}(), which could change the role it runs as or run SQL given as text"),
            ));
        }
        let squeezed: String = word.split_whitespace().collect::<Vec<_>>().join(" ");
        if squeezed.contains("session_authorization")
            || squeezed.contains("session authorization")
            || (word == "authorization" && i > 0 && text(i - 1) == "session")
        {
            return Err(refuse(
                INSUFFICIENT_PRIVILEGE,
                "a function body may not change the session authorization: writes run as their role",
            ));
        }
        // Role statements inside a body would bypass the password's turning into a verifier
        // and the rules of sql::roles (and change the roles' state where the applier does not
        // look for it): they must be statements of their own.
        let role_ddl = matches!(word.as_str(), "create" | "alter" | "drop")
            && matches!(next.as_str(), "role" | "user" | "group");
        let membership = matches!(word.as_str(), "grant" | "revoke")
            && !(i + 1..tokens.len())
                .map(&text)
                .take_while(|t| !matches!(t.as_str(), "to" | "from" | ";"))
                .any(|t| t == "on");
        if role_ddl || membership {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                "roles and role memberships cannot change inside a function body or DO block; send CREATE/ALTER/DROP ROLE, GRANT role TO ... and REVOKE role FROM ... as statements of their own",
            ));
        }
        if word == "execute" && statement_start {
            match constant_dynamic_sql(&text, i + 1) {
                Some(sql) => check_dynamic_sql(&sql)?,
                None => {
                    return Err(refuse(
                        FEATURE_NOT_SUPPORTED,
                        "dynamic SQL in a function body must be a constant string, or format() of a constant string with only %I and %L placeholders (EXECUTE format('INSERT INTO %I VALUES (%L)', t, v)): SQL put together at run time could escape the role the write runs as",
                    ))
                }
            }
        }
        if let Some(inner) = word.strip_prefix('\'').and_then(|w| w.strip_suffix('\'')) {
            let value = inner.replace("''", "'");
            // Dynamic SQL that changes the session: EXECUTE 'SET ...', format('SET %s ...').
            if looks_like_set_statement(&value) || value.contains("set_config") {
                return Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    "dynamic SQL that changes settings (EXECUTE 'SET ...') inside a function body would change the applier's session for later writes; give the function a SET clause instead",
                ));
            }
            if time_literals::is_time_string(&value) {
                return Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    time_literals::refusal_message(&value),
                ));
            }
        }
    }
    Ok(())
}

/// The number of arguments of a call in a function body whose `(` is token `open`: commas at
/// the call's own depth, up to its `)`.
fn body_call_arity(text: &dyn Fn(usize) -> String, open: usize, len: usize) -> usize {
    let (mut depth, mut commas) = (0usize, 0usize);
    for j in open..len {
        match text(j).as_str() {
            "(" | "[" => depth += 1,
            ")" | "]" => {
                depth -= 1;
                if depth == 0 {
                    return if j == open + 1 { 0 } else { commas + 1 };
                }
            }
            "," if depth == 1 => commas += 1,
            _ => {}
        }
    }
    commas + 1
}

/// The SQL a PL/pgSQL `EXECUTE` whose argument starts at token `at` runs, if it is constant: a
/// single string literal, or `format(` a string literal with only `%I`, `%L` and `%%`
/// placeholders `, ...)`, followed by the end of the statement, `USING` or `INTO`. The
/// placeholders are filled with a dummy identifier and literal, so the result can be checked
/// like a statement ([`check_dynamic_sql`]). `None` for SQL put together at run time.
fn constant_dynamic_sql(text: &dyn Fn(usize) -> String, at: usize) -> Option<String> {
    let first = text(at);
    if let Some(sql) = literal_value(&first) {
        return matches!(text(at + 1).as_str(), ";" | "using" | "into" | "").then_some(sql);
    }
    if first != "format" || text(at + 1) != "(" || !matches!(text(at + 3).as_str(), "," | ")") {
        return None;
    }
    let fmt = literal_value(&text(at + 2))?;
    let mut out = String::new();
    let mut parts = fmt.split('%');
    out.push_str(parts.next().unwrap_or(""));
    let mut escaped = false;
    for part in parts {
        if escaped {
            escaped = false;
            out.push_str(part);
            continue;
        }
        match part.chars().next() {
            Some('i') => out.push_str("raftpg_dynamic_name"),
            Some('l') => out.push_str("'0'"),
            None => {
                out.push('%');
                escaped = true;
                continue;
            }
            Some(_) => return None,
        }
        out.push_str(&part[1..]);
    }
    Some(out)
}

/// The value of a string literal token (quoted, E-quoted or dollar-quoted), or `None`.
fn literal_value(token: &str) -> Option<String> {
    if let Some(inner) = token
        .strip_prefix("e'")
        .or_else(|| token.strip_prefix('\''))
        .and_then(|t| t.strip_suffix('\''))
    {
        return Some(inner.replace("''", "'"));
    }
    let rest = token.strip_prefix('$')?;
    let tag_end = rest.find('$')?;
    let tag = &rest[..tag_end];
    let body = rest[tag_end + 1..].strip_suffix(&format!("${tag}$"))?;
    Some(body.to_string())
}

/// Checks the constant SQL of a function body's `EXECUTE` as the gate checks a statement for
/// what could escape: raftpg's own objects and roles, the role escapes, role statements and
/// settings (which must be sent as statements of their own, where the gate sees them whole).
fn check_dynamic_sql(sql: &str) -> Result<(), Refusal> {
    let (parsed, tree) = parse_any(sql).map_err(|_| {
        refuse(
            FEATURE_NOT_SUPPORTED,
            "raftpg cannot read the SQL of an EXECUTE in this function body to check it",
        )
    })?;
    check_raftpg_names(&tree)?;
    check_role_escapes(&tree)?;
    for raw in &parsed.protobuf.stmts {
        let stmt = raw.stmt.as_ref().and_then(|n| n.node.as_ref());
        if matches!(
            stmt,
            Some(
                NodeEnum::CreateRoleStmt(_)
                    | NodeEnum::AlterRoleStmt(_)
                    | NodeEnum::AlterRoleSetStmt(_)
                    | NodeEnum::DropRoleStmt(_)
                    | NodeEnum::GrantRoleStmt(_)
                    | NodeEnum::VariableSetStmt(_)
                    | NodeEnum::RenameStmt(_)
            )
        ) {
            return Err(refuse(
                FEATURE_NOT_SUPPORTED,
                "roles, settings and renames cannot change through dynamic SQL in a function body; send them as statements",
            ));
        }
    }
    Ok(())
}

/// The settings a write statement changes with `SET LOCAL`, as quoted identifiers ready for
/// `SET LOCAL <name> TO DEFAULT` (used by the applier to undo them at the write's end; see
/// session_rules). Empty for any other statement.
pub fn settings_set_by(sql: &str) -> Vec<String> {
    let Ok(NodeEnum::VariableSetStmt(s)) = parse_one(sql) else {
        return Vec::new();
    };
    if !s.is_local || s.name.is_empty() {
        return Vec::new();
    }
    let quoted = s
        .name
        .split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".");
    vec![quoted]
}

/// The function a `CREATE TRIGGER` statement runs (its name parts, as written), so that the
/// leader can check the function's body as it is now in the catalog: it may have been created
/// before raftpg's current rules (see `service::write`).
pub fn trigger_function(sql: &str) -> Option<Vec<String>> {
    // Every write statement passes here on the leader: parse again only a possible trigger.
    if !contains_ignore_case(sql, "trigger") {
        return None;
    }
    let NodeEnum::CreateTrigStmt(t) = parse_one(sql).ok()? else {
        return None;
    };
    let parts: Vec<String> = t
        .funcname
        .iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then_some(parts)
}

/// Checks the body of an existing function in `language` as the gate checks a body being
/// created (for trigger functions, see [`trigger_function`]); functions in other languages
/// than SQL and PL/pgSQL must be classified built-ins whose verdict allows writes or internal
/// trigger functions.
pub fn check_existing_function(
    schema: &str,
    name: &str,
    language: &str,
    body: &str,
) -> Result<(), Refusal> {
    match language {
        "sql" | "plpgsql" => check_body(body).map_err(|r| {
            refuse(
                r.sqlstate,
                format!("function {schema}.{name}: {}", r.message),
            )
        }),
        _ => {
            let builtin = matches!(schema, "pg_catalog");
            match catalog::lookup(&name.to_ascii_lowercase(), 0, builtin) {
                Some((v, _)) if v.allowed_in_writes() || v == catalog::Verdict::Internal => Ok(()),
                _ => Err(refuse(
                    FEATURE_NOT_SUPPORTED,
                    format!("trigger function {schema}.{name} is written in {language}, which raftpg cannot check; write trigger functions in PL/pgSQL or SQL"),
                )),
            }
        }
    }
}

/// Checks an existing view's query (`pg_get_viewdef`) as the gate checks a write: it must pass
/// unchanged (a query that needs a rewrite — `now()`, `random()` — gives each node its own
/// values).
pub fn check_view_definition(name: &str, query: &str) -> Result<(), Refusal> {
    let checked = prepare_write(query.trim().trim_end_matches(';'))
        .map_err(|r| refuse(r.sqlstate, format!("view {name}: {}", r.message)))?;
    if checked != query.trim().trim_end_matches(';') {
        return Err(refuse(
            FEATURE_NOT_SUPPORTED,
            format!(
                "view {name} calls time or random functions that give each node its own values"
            ),
        ));
    }
    Ok(())
}

/// The extension (and version, if named) a `CREATE EXTENSION` or `ALTER EXTENSION ... UPDATE`
/// statement needs installed: the leader refuses the write if its own PostgreSQL lacks it (a
/// node that lacks it while applying waits, see `apply::applier::classify`).
pub fn extension_required(sql: &str) -> Option<(String, Option<String>)> {
    // Every write statement passes here on the leader: parse again only a possible extension.
    if !contains_ignore_case(sql, "extension") {
        return None;
    }
    let (name, options) = match parse_one(sql).ok()? {
        NodeEnum::CreateExtensionStmt(s) => (s.extname, s.options),
        NodeEnum::AlterExtensionStmt(s) => (s.extname, s.options),
        _ => return None,
    };
    let version = options.iter().find_map(|o| match &o.node {
        Some(NodeEnum::DefElem(d)) if d.defname == "new_version" => {
            match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                Some(NodeEnum::String(v)) => Some(v.sval.clone()),
                _ => None,
            }
        }
        _ => None,
    });
    Some((name, version))
}

/// Whether a string (lower case) reads as a `SET`/`RESET` command: `set [local|session] <name>
/// =|to ...` or `reset <name>` — dynamic SQL built from it would change the applier's session.
fn looks_like_set_statement(s: &str) -> bool {
    let mut words = s.split_whitespace();
    match words.next() {
        Some("reset") => words.next().is_some(),
        Some("set") => {
            let mut name = words.next();
            if matches!(name, Some("local" | "session")) {
                name = words.next();
            }
            match name {
                Some(n) if n.contains('=') => true,
                Some(_) => words
                    .next()
                    .is_some_and(|w| w.starts_with('=') || w == "to"),
                None => false,
            }
        }
        _ => false,
    }
}

/// Whether a parsed statement is a query a read may run (`SELECT`/`VALUES`/`TABLE`/`WITH …
/// SELECT` without `INTO` or locking, `EXPLAIN` without `ANALYZE`, `SHOW`): the kind rule of
/// [`check_read`], for a caller that parsed the statement already.
pub fn is_query(stmt: &NodeEnum) -> bool {
    match stmt {
        NodeEnum::SelectStmt(s) => s.into_clause.is_none() && s.locking_clause.is_empty(),
        NodeEnum::ExplainStmt(s) => !s.options.iter().any(|o| {
            matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze"))
        }),
        NodeEnum::VariableShowStmt(_) => true,
        _ => false,
    }
}

/// Refuses calls a read may not make: functions that leave state in the pooled connection
/// (session-level advisory locks, the random seed, …) or escape checking.
fn check_read_calls(tree: &serde_json::Value) -> Result<(), Refusal> {
    let mut refusal = None;
    walk(tree, &mut |kind, node| {
        if refusal.is_some() || kind != "FuncCall" {
            return;
        }
        let (schema, name) = func_name(node);
        if let Some((verdict, why)) = call_verdict(schema.as_deref(), &name, arity(node)) {
            if !verdict.allowed_in_reads() {
                refusal = Some(read_refusal(&name, verdict, why));
            }
        }
    });
    refusal.map_or(Ok(()), Err)
}

/// Most read verdicts [`check_read_cached`] remembers.
const READ_VERDICTS_MAX: usize = 4096;

/// Longest read text whose verdict is remembered (longer reads are checked every time).
const READ_VERDICT_SQL_MAX: usize = 4096;

/// Verdicts of [`check_read`] by SQL text: the check depends on the text alone (parsing it,
/// the function catalog compiled into the node), so a read that comes again is not parsed
/// again. Bounded: emptied when full.
static READ_VERDICTS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Result<(), Refusal>>>,
> = std::sync::LazyLock::new(Default::default);

/// [`check_read`], remembering the verdicts of short texts (see [`READ_VERDICTS`]).
pub fn check_read_cached(sql: &str) -> Result<(), Refusal> {
    if sql.len() > READ_VERDICT_SQL_MAX {
        return check_read(sql);
    }
    let lock = || READ_VERDICTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(verdict) = lock().get(sql) {
        return verdict.clone();
    }
    let verdict = check_read(sql);
    let mut verdicts = lock();
    if verdicts.len() >= READ_VERDICTS_MAX {
        verdicts.clear();
    }
    verdicts.insert(sql.to_string(), verdict.clone());
    verdict
}

/// Checks the SQL of a read: only queries are allowed.
pub fn check_read(sql: &str) -> Result<(), Refusal> {
    let (parsed, tree) = parse(sql)?;
    check_role_escapes(&tree)?;
    check_read_calls(&tree)?;
    let stmt = first_statement(parsed)?;
    if is_query(&stmt) {
        Ok(())
    } else {
        Err(refuse(
            READ_ONLY,
            "the read API runs queries only (SELECT, VALUES, TABLE, WITH ... SELECT, EXPLAIN, SHOW) without FOR UPDATE/SHARE or INTO; send writes to Write.Execute",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_write(sql: &str) -> Result<(), Refusal> {
        prepare_write(sql).map(|_| ())
    }

    #[test]
    fn remembered_read_verdicts_are_the_verdicts() {
        for sql in [
            "SELECT 1",
            "DELETE FROM t",
            "SELECT pg_advisory_lock(1)",
            "SELECT 1",
            "DELETE FROM t",
        ] {
            assert_eq!(check_read_cached(sql), check_read(sql), "{sql}");
        }
        let long = format!("SELECT 1 -- {}", "x".repeat(READ_VERDICT_SQL_MAX));
        assert_eq!(check_read_cached(&long), Ok(()));
    }

    #[test]
    fn rewrites_time_and_randomness() {
        assert_eq!(
            prepare_write("INSERT INTO t VALUES (now())").unwrap(),
            "INSERT INTO t VALUES (raftpg.now())"
        );
        assert_eq!(
            prepare_write(
                "INSERT INTO t VALUES (pg_catalog.NOW(), CURRENT_TIMESTAMP, current_date, 'now()')"
            )
            .unwrap(),
            "INSERT INTO t VALUES (raftpg.now(), raftpg.now(), raftpg.current_date(), 'now()')"
        );
        assert_eq!(
            prepare_write("CREATE TABLE e (at timestamptz DEFAULT clock_timestamp(), id uuid DEFAULT gen_random_uuid())").unwrap(),
            "CREATE TABLE e (at timestamptz DEFAULT raftpg.now(), id uuid DEFAULT raftpg.gen_random_uuid())"
        );
        assert_eq!(
            prepare_write("SELECT raftpg.random()").unwrap(),
            "SELECT raftpg.random()"
        );
        assert_eq!(
            prepare_write("INSERT INTO t SELECT random() FROM generate_series(1, 3) g ORDER BY g")
                .unwrap(),
            "INSERT INTO t SELECT raftpg.random() FROM generate_series(1, 3) g ORDER BY g"
        );
    }

    #[test]
    fn writes() {
        assert!(check_write("INSERT INTO t VALUES (1)").is_ok());
        assert!(check_write("CREATE TABLE t (id serial primary key)").is_ok());
        assert!(check_write("SET LOCAL work_mem = '64MB'").is_ok());
        // Bodies: table privileges and constant dynamic SQL are fine; role escapes are not.
        assert!(check_write("DO $$ BEGIN GRANT SELECT ON t TO bob; END $$").is_ok());
        assert!(check_write(
            "CREATE FUNCTION f(n text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE format('INSERT INTO %I VALUES (%L)', n, 'x'); END $$"
        )
        .is_ok());
        for escape in [
            "SELECT query_to_xml('select 1', true, true, '')",
            "DO $$ BEGIN PERFORM ts_stat('select 1'); END $$",
        ] {
            assert_eq!(
                check_write(escape).unwrap_err().sqlstate,
                INSUFFICIENT_PRIVILEGE,
                "{escape}"
            );
        }
        assert_eq!(
            check_read("SELECT set_config('role', 'raftpg_reader', true)")
                .unwrap_err()
                .sqlstate,
            INSUFFICIENT_PRIVILEGE
        );
        assert_eq!(
            check_write("INSRT INTO t").unwrap_err().sqlstate,
            SYNTAX_ERROR
        );
        assert_eq!(
            check_write("BEGIN").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("COMMIT").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("SET work_mem = '1MB'").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("VACUUM t").unwrap_err().sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("CREATE TEMP TABLE x (a int)")
                .unwrap_err()
                .sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("CREATE INDEX CONCURRENTLY i ON t (a)")
                .unwrap_err()
                .sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("SELECT 1; SELECT 2").unwrap_err().sqlstate,
            SYNTAX_ERROR
        );
        assert_eq!(
            check_write("UPDATE raftpg.applied SET log_index = 0")
                .unwrap_err()
                .sqlstate,
            INSUFFICIENT_PRIVILEGE
        );
    }

    #[test]
    fn refuses_what_would_diverge() {
        for sql in [
            "SELECT pg_advisory_lock(1)",
            "INSERT INTO t VALUES (txid_current())",
            "UPDATE t SET r = random()",
            "UPDATE t SET id = nextval('s') WHERE id < 0",
            "INSERT INTO t VALUES (CURRENT_TIMESTAMP(3))",
            "INSERT INTO t SELECT * FROM u",
            "DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT 3)",
            "DELETE FROM a USING a AS a2 TABLESAMPLE BERNOULLI (50) WHERE a.id = a2.id",
            "INSERT INTO t SELECT * FROM u TABLESAMPLE SYSTEM (10) REPEATABLE (1) ORDER BY id",
            "CREATE SEQUENCE s CACHE 20",
            "CREATE TABLE i (id int GENERATED ALWAYS AS IDENTITY (CACHE 5))",
            "CREATE FUNCTION f() RETURNS timestamptz LANGUAGE sql AS $$ SELECT now() $$",
            "CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN pg_backend_pid(); END $$",
            "DO $$ BEGIN PERFORM random(); END $$",
        ] {
            assert_eq!(check_write(sql).err().map(|r| r.sqlstate), Some(FEATURE_NOT_SUPPORTED), "{sql}");
        }
        assert!(check_write("INSERT INTO t VALUES (nextval('s'))").is_ok());
        assert!(check_write("INSERT INTO t SELECT * FROM u ORDER BY id").is_ok());
        assert!(check_write("INSERT INTO t SELECT 1, 2").is_ok());
        assert!(check_write("UPDATE t SET v = v + 1 WHERE id = $1").is_ok());
        assert!(check_write(
            "CREATE FUNCTION f() RETURNS timestamptz LANGUAGE sql AS $$ SELECT raftpg.now() $$"
        )
        .is_ok());
        assert!(check_write("CREATE SEQUENCE s CACHE 1").is_ok());
        assert_eq!(
            check_write("UPDATE t SET r = raftpg.random()")
                .unwrap_err()
                .sqlstate,
            FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            check_write("INSERT INTO t VALUES ((SELECT log_index FROM raftpg.applied))")
                .unwrap_err()
                .sqlstate,
            INSUFFICIENT_PRIVILEGE
        );
    }

    #[test]
    fn raftpg_bookkeeping_is_out_of_reach() {
        for sql in [
            "DROP SCHEMA raftpg CASCADE",
            "DROP SCHEMA public, raftpg",
            "ALTER SCHEMA raftpg RENAME TO x",
            "CREATE TABLE raftpg.x (a int)",
            "ALTER TABLE t SET SCHEMA raftpg",
            "GRANT ALL ON SCHEMA raftpg TO bob",
            "GRANT SELECT ON t TO raftpg_reader",
            "ALTER TABLE t OWNER TO raftpg",
            "DROP OWNED BY raftpg_reader",
            "REVOKE ALL ON ALL TABLES IN SCHEMA raftpg FROM PUBLIC",
            "ALTER FUNCTION raftpg.now() RENAME TO x",
            "DROP FUNCTION raftpg.random()",
            "CREATE OR REPLACE FUNCTION raftpg.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$",
            "SELECT raftpg.begin_entry('1', '1', NULL, NULL, 0)",
            "SELECT pg_relation_size('raftpg.applied')",
            "SET LOCAL search_path = app, raftpg",
            "SET LOCAL search_path = 'raftpg'",
            "SET LOCAL search_path = \"$user\", public",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = '$user' AS $$ SELECT 1 $$",
            "TRUNCATE raftpg.requests",
            "COMMENT ON SCHEMA raftpg IS 'x'",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ DELETE FROM raftpg.requests $$",
        ] {
            assert_eq!(check_write(sql).err().map(|r| r.sqlstate), Some(INSUFFICIENT_PRIVILEGE), "{sql}");
        }
        assert!(
            check_write("INSERT INTO t VALUES (raftpg.now(), raftpg.gen_random_uuid())").is_ok()
        );
        assert!(check_write("CREATE TABLE t (at timestamptz DEFAULT raftpg.now())").is_ok());
        assert!(check_write("INSERT INTO t (url) VALUES ('https://raftpg.io')").is_ok());
    }

    #[test]
    fn set_local_only_for_reviewed_settings() {
        for sql in [
            "SET LOCAL work_mem = '64MB'",
            "SET LOCAL enable_seqscan = off",
            "SET LOCAL search_path = app, public",
            "SET LOCAL TIME ZONE 'Europe/Paris'",
            "SET LOCAL myapp.tenant = '7'",
            "SET LOCAL work_mem TO DEFAULT",
            "SET CONSTRAINTS ALL DEFERRED",
            "CREATE FUNCTION g() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE t SET a = 1; NEW.b := 'set me'; RETURN NEW; END $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem = '8MB' AS $$ SELECT 1 $$",
        ] {
            assert!(check_write(sql).is_ok(), "{sql}");
        }
        for sql in [
            "SET LOCAL statement_timeout = 1",
            "SET LOCAL lock_timeout = '1ms'",
            "SET LOCAL ROLE pg_read_all_data",
            "SET LOCAL SESSION AUTHORIZATION bob",
            "SET LOCAL transaction_read_only = on",
            "SET LOCAL TRANSACTION READ ONLY",
            "SET LOCAL session_replication_role = replica",
            "SET LOCAL raftpg.seed = '1'",
            "SET LOCAL lc_monetary = 'de_DE.UTF-8'",
            "RESET work_mem",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET statement_timeout = 1 AS $$ SELECT 1 $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET LOCAL work_mem = '1MB'; END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN RESET ALL; END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET search_path = x; END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'SET TimeZone = ' || quote_literal('UTC'); END $$",
            "DO $$ BEGIN EXECUTE format('SET LOCAL %s = %L', 'work_mem', '1MB'); END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'CREATE ROLE x LOGIN PASSWORD ''p'''",
            "DO $$ BEGIN ALTER ROLE bob PASSWORD 'p'; END $$",
            "DO $$ BEGIN GRANT raftpg_admin TO bob; END $$",
            "DO $$ BEGIN EXECUTE 'DROP ROLE bob'; END $$",
            "DO $$ BEGIN EXECUTE 'SE' || 'T work_mem = 1'; END $$",
            "NOTIFY games",
            "CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'lib', 'f'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS $$ return 1 $$",
        ] {
            assert_eq!(check_write(sql).err().map(|r| r.sqlstate), Some(FEATURE_NOT_SUPPORTED), "{sql}");
        }
    }

    #[test]
    fn time_strings() {
        assert_eq!(
            prepare_write("INSERT INTO ev (at, d) VALUES ('now'::timestamptz, CAST('today' AS date))").unwrap(),
            "INSERT INTO ev (at, d) VALUES ((raftpg.now())::timestamptz, CAST((date_trunc('day', raftpg.now())) AS date))"
        );
        assert_eq!(
            prepare_write("UPDATE ev SET at = timestamptz 'tomorrow' WHERE id = 1").unwrap(),
            "UPDATE ev SET at = CAST(((date_trunc('day', raftpg.now()) + interval '1 day')) AS timestamptz) WHERE id = 1"
        );
        assert_eq!(
            prepare_write("DELETE FROM ev WHERE at < 'yesterday'::timestamp(0)").unwrap(),
            "DELETE FROM ev WHERE at < ((date_trunc('day', raftpg.now()) - interval '1 day'))::timestamp(0)"
        );
        for sql in [
            "INSERT INTO ev (at, d) VALUES ('now', 'today')",
            "INSERT INTO ev (at) VALUES ('tomorrow 10:00'::timestamptz)",
            "UPDATE ev SET at = 'NOW' WHERE id = 1",
            "INSERT INTO ev (ats) VALUES ('{now}'::timestamptz[])",
            "INSERT INTO ev (at) VALUES ('now'::text::timestamptz)",
            "CREATE TABLE ev (at timestamptz DEFAULT 'now')",
            "CREATE TABLE ev (at timestamptz DEFAULT 'now'::timestamptz)",
            "CREATE VIEW v AS SELECT 'today'::date AS d",
            "CREATE FUNCTION f() RETURNS date LANGUAGE sql AS $$ SELECT 'today'::date $$",
        ] {
            assert_eq!(
                check_write(sql).err().map(|r| r.sqlstate),
                Some(FEATURE_NOT_SUPPORTED),
                "{sql}"
            );
        }
        assert!(check_write("INSERT INTO msg (body) VALUES ('see you tomorrow')").is_ok());
        assert!(check_write("INSERT INTO ev (at) VALUES ('2026-01-01'::timestamptz)").is_ok());
    }

    #[test]
    fn extensions_named() {
        assert_eq!(
            extension_required("CREATE EXTENSION IF NOT EXISTS pgcrypto"),
            Some(("pgcrypto".into(), None))
        );
        assert_eq!(
            extension_required("ALTER EXTENSION hstore UPDATE TO '1.8'"),
            Some(("hstore".into(), Some("1.8".into())))
        );
        assert_eq!(extension_required("CREATE TABLE t (a int)"), None);
    }

    #[test]
    fn currval_only_in_queries() {
        assert!(check_write("INSERT INTO t (parent) VALUES (currval('p_id_seq'))").is_ok());
        assert!(check_write("SELECT lastval()").is_ok());
        for sql in [
            "CREATE TABLE t (a bigint DEFAULT currval('s'))",
            "CREATE VIEW v AS SELECT lastval()",
            "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS $$ SELECT currval('s') $$",
        ] {
            assert_eq!(
                check_write(sql).err().map(|r| r.sqlstate),
                Some(FEATURE_NOT_SUPPORTED),
                "{sql}"
            );
        }
    }

    #[test]
    fn reads() {
        assert!(check_read("SELECT * FROM t WHERE id = $1").is_ok());
        assert!(check_read("WITH x AS (SELECT 1) SELECT * FROM x").is_ok());
        assert!(check_read("SHOW server_version").is_ok());
        assert_eq!(
            check_read("INSERT INTO t VALUES (1)").unwrap_err().sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("SELECT * FROM t FOR UPDATE")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("SET statement_timeout = 1")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
        assert_eq!(
            check_read("EXPLAIN ANALYZE DELETE FROM t")
                .unwrap_err()
                .sqlstate,
            READ_ONLY
        );
    }

    #[test]
    fn the_allowlist_refuses_what_differs_between_nodes() {
        // The probes of issue 18: sizes, physical row addresses, transaction ids.
        for sql in [
            "INSERT INTO probe (v) VALUES (pg_database_size(current_database())::text)",
            "INSERT INTO probe (v) VALUES (pg_relation_size('probe')::text)",
            "INSERT INTO probe (v) VALUES (pg_size_pretty(pg_total_relation_size('probe')))",
            "INSERT INTO probe (v) SELECT ctid::text FROM probe ORDER BY id LIMIT 1",
            "INSERT INTO probe (v) SELECT xmin::text FROM probe ORDER BY id LIMIT 1",
            "INSERT INTO probe (v) VALUES (pg_table_size('probe')::text)",
            "INSERT INTO probe (v) VALUES (pg_indexes_size('probe')::text)",
            "DELETE FROM t WHERE ctid = (SELECT min(ctid) FROM t)",
            "UPDATE t SET v = 1 WHERE id = 1 AND xmin = '123'",
            "INSERT INTO t SELECT tableoid FROM u ORDER BY id",
            "INSERT INTO t VALUES (age('2020-01-01'::timestamp))",
            "INSERT INTO t VALUES (pg_stat_get_numscans('t'::regclass))",
            "INSERT INTO t VALUES (pg_catalog.pg_backend_pid())",
            "INSERT INTO u VALUES (crypt('pw', gen_salt('bf')))",
            "INSERT INTO u VALUES (public.gen_random_bytes(16))",
            "CREATE VIEW v AS SELECT ctid, * FROM t",
            "CREATE EXTENSION pageinspect",
            "CREATE EXTENSION dblink",
            "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS $$ SELECT pg_relation_size('t') $$",
            "CREATE FUNCTION f(d timestamp) RETURNS interval LANGUAGE sql AS $$ SELECT age(d) $$",
            "SELECT pg_advisory_lock(1)",
            "SELECT setseed(0.5)",
            "SELECT lo_creat(-1)",
            "INSERT INTO t SELECT relname, relpages FROM pg_class ORDER BY 1",
            "INSERT INTO t SELECT count(*) FROM pg_catalog.pg_stat_activity ORDER BY 1",
            "INSERT INTO t SELECT specific_name FROM information_schema.routines ORDER BY 1",
            "CREATE VIEW sizes AS SELECT relname FROM pg_class",
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_class WHERE relname = 't') THEN NULL; END IF; END $$",
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT ctid::text FROM t LIMIT 1 $$",
        ] {
            let r = check_write(sql).expect_err(sql);
            assert!(
                r.message.contains("instead")
                    || r.message.contains("; ")
                    || r.message.contains("only"),
                "{sql}: {}",
                r.message
            );
        }
        for sql in [
            "INSERT INTO t VALUES (age('2020-01-02'::timestamp, '2020-01-01'::timestamp))",
            "INSERT INTO t SELECT tableoid::regclass::text, id FROM u ORDER BY id",
            "INSERT INTO t VALUES (to_char(now(), 'YYYY-MM-DD'), format('%s', 1))",
            "INSERT INTO t VALUES (has_table_privilege('t', 'select'))",
            "INSERT INTO u VALUES (crypt('pw', '$2a$06$abcdefghijklmnopqrstuv'))",
            "CREATE EXTENSION pgcrypto",
            "CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\"",
            "CREATE FUNCTION f(a timestamp, b timestamp) RETURNS interval LANGUAGE sql AS $$ SELECT age(a, b) $$",
            "INSERT INTO t VALUES (nextval('s'))",
            "INSERT INTO t VALUES (myschema.pg_relation_size(1))",
            "INSERT INTO t SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            "INSERT INTO t SELECT column_name FROM information_schema.columns WHERE table_name = 'u' ORDER BY ordinal_position",
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = 't') THEN CREATE TABLE t (a int); END IF; END $$",
            "CREATE TABLE pg_mine (a int)",
            "INSERT INTO app.pg_class VALUES (1)",
        ] {
            check_write(sql).unwrap_or_else(|r| panic!("{sql}: {}", r.message));
        }
    }

    #[test]
    fn reads_leave_no_state_behind() {
        for sql in [
            "SELECT pg_advisory_lock(42)::text",
            "SELECT pg_try_advisory_lock(1)",
            "SELECT setseed(0.1)",
            "SELECT pg_advisory_unlock_all()",
        ] {
            assert!(check_read(sql).is_err(), "{sql}");
        }
        for sql in [
            "SELECT pg_relation_size('t')",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT version(), pg_backend_pid(), now()",
        ] {
            check_read(sql).unwrap_or_else(|r| panic!("{sql}: {}", r.message));
        }
    }
}
