//! No module cycles among the node's modules (issue 15).
//!
//! Reads `node/src` as text (std only, no parser crate), maps every path that starts with
//! `crate::`, `super::` or `self::` (also inside `use` trees like `use crate::{a, b::{c, d}}`)
//! and every later use of a module imported by name (`use crate::grpc;` … `grpc::write::X`) to
//! the module it names: the deepest module that is a file (`apply/state_machine.rs` is
//! `apply::state_machine`, `x/mod.rs` is `x`, `lib.rs` is the crate root). Comments, string
//! literals and `#[cfg(test)]` items are skipped; `main.rs` is a separate crate and is skipped.
//!
//! Two graphs must be acyclic:
//! - between file modules, ignoring a module's references to its own descendants (a folder's
//!   `mod.rs` declares and re-exports its children);
//! - between the top-level modules (`raft`, `apply`, `pg`, `sql`, `service`, `grpc`,
//!   `command`, `config`, `server`, …).
//!
//! A failure names each cycle as a path, with the file and line of every reference on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path without `crate`: `["apply", "state_machine"]`; the crate root is `[]`.
type Module = Vec<String>;

/// Where a reference was seen: (file relative to `node/`, line).
type Site = (String, usize);

/// Edges of a graph with the first place each was seen.
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

// ---------------------------------------------------------------------------------------------
// Reading the source tree

/// The module a file under `src/` defines, or `None` for files that are not part of the
/// library (`main.rs`, `bin/`).
fn module_of(rel: &Path) -> Option<Module> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    if parts.first().is_some_and(|p| p == "bin") || (parts.is_empty() && file == "main.rs") {
        return None;
    }
    match file.as_str() {
        "lib.rs" if parts.is_empty() => {}
        "mod.rs" => {}
        f => parts.push(f.strip_suffix(".rs")?.to_string()),
    }
    Some(parts)
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing: comments and literals out, `#[cfg(test)]` items out, line structure kept

/// The source with comments and the contents of string and char literals replaced by spaces
/// (newlines kept, so line numbers stay right).
fn strip_comments_and_literals(src: &str) -> Vec<char> {
    let c: Vec<char> = src.chars().collect();
    let mut out = c.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for ch in out.iter_mut().take(to.min(c.len())).skip(from) {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            let end = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
            blank(&mut out, i, end);
            i = end;
        } else if c[i] == '/' && next == Some('*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c[i] == 'r'
            && (i == 0 || !ident(c[i - 1]) || (c[i - 1] == 'b' && (i < 2 || !ident(c[i - 2]))))
            && matches!(next, Some('"') | Some('#'))
        {
            // A raw string r"…" / r#"…"# (or the identifier r#name).
            let hashes = c[i + 1..].iter().take_while(|&&x| x == '#').count();
            if c.get(i + 1 + hashes) != Some(&'"') {
                i += 1;
                continue;
            }
            let body = i + 2 + hashes;
            let mut j = body;
            while j < c.len() {
                if c[j] == '"'
                    && c[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&x| x == '#')
                        .count()
                        == hashes
                {
                    break;
                }
                j += 1;
            }
            blank(&mut out, body, j);
            i = j + 1 + hashes;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j);
            i = j + 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if next == Some('\\') {
                let end = (i + 2..c.len()).find(|&j| c[j] == '\'').unwrap_or(c.len());
                blank(&mut out, i + 1, end);
                i = end + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                blank(&mut out, i + 1, i + 2);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Blanks every item that follows `#[cfg(test)]` (a `mod tests { … }`, a `fn`, a `use …;`).
fn strip_cfg_test(c: &mut [char]) {
    let pat: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pat.len() <= c.len() {
        if c[i..i + pat.len()] != pat[..] {
            i += 1;
            continue;
        }
        // The item ends at the first `;` outside braces, or at the brace closing its body.
        let (mut j, mut depth) = (i + pat.len(), 0usize);
        while j < c.len() {
            match c[j] {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = (j + 1).min(c.len());
        for ch in &mut c[i..end] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = end;
    }
}

// ---------------------------------------------------------------------------------------------
// Paths

/// A path found in the source: its segments (starting with `crate`, `super`, `self` or an
/// imported module's name), the name it is imported as when it is a `use` of one whole path,
/// and its line.
#[derive(Debug, PartialEq)]
struct PathRef {
    segments: Vec<String>,
    alias: Option<String>,
    in_use: bool,
    line: usize,
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Cursor over the stripped source.
struct Cursor<'a> {
    c: &'a [char],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.c.len() && self.c[self.i].is_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, s: &str) -> bool {
        self.skip_ws();
        let s: Vec<char> = s.chars().collect();
        if self.c[self.i..].starts_with(&s) {
            self.i += s.len();
            true
        } else {
            false
        }
    }
    fn ident(&mut self) -> Option<String> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.c.len() && is_ident(self.c[self.i]) {
            self.i += 1;
        }
        (self.i > start).then(|| self.c[start..self.i].iter().collect())
    }
    /// A use tree from the cursor: `a::b`, `a::b as c`, `a::{b, c::d}`, `a::*`. Returns every
    /// complete path with its alias (`as` name, or `None`).
    fn tree(&mut self, prefix: &[String]) -> Vec<(Vec<String>, Option<String>)> {
        let mut path = prefix.to_vec();
        loop {
            if self.eat("{") {
                let mut out = Vec::new();
                loop {
                    if self.eat("}") {
                        return out;
                    }
                    let before = self.i;
                    out.extend(self.tree(&path));
                    self.eat(",");
                    if self.i == before {
                        return out; // not a use tree after all
                    }
                }
            }
            if self.eat("*") {
                return vec![(path, None)];
            }
            let Some(seg) = self.ident() else {
                return vec![(path, None)];
            };
            path.push(seg);
            let save = self.i;
            if self.eat("::") {
                continue;
            }
            self.i = save;
            let alias = if self.eat("as ") { self.ident() } else { None };
            if alias.is_none() {
                self.i = save;
            }
            return vec![(path, alias)];
        }
    }
}

/// The identifier that ends right before `i` (skipping whitespace), if any.
fn word_before(c: &[char], i: usize) -> String {
    let mut j = i;
    while j > 0 && c[j - 1].is_whitespace() {
        j -= 1;
    }
    let end = j;
    while j > 0 && is_ident(c[j - 1]) {
        j -= 1;
    }
    c[j..end].iter().collect()
}

/// Every path that starts with one of `roots` followed by `::`, at a word boundary and not
/// after `::` or `$` (so `$crate::` and `a::crate_x::` do not count).
fn find_paths(c: &[char], roots: &[String]) -> Vec<PathRef> {
    let line_of = |i: usize| 1 + c[..i].iter().filter(|&&ch| ch == '\n').count();
    let roots: Vec<Vec<char>> = roots
        .iter()
        .map(|r| format!("{r}::").chars().collect())
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let boundary = i == 0 || !(is_ident(c[i - 1]) || c[i - 1] == ':' || c[i - 1] == '$');
        if boundary && roots.iter().any(|r| c[i..].starts_with(r)) {
            let in_use = word_before(c, i) == "use";
            let mut cur = Cursor { c, i };
            for (segments, alias) in cur.tree(&[]) {
                out.push(PathRef {
                    segments,
                    alias,
                    in_use,
                    line: line_of(i),
                });
            }
            i = cur.i.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// The module a path names, seen from module `from`: its longest prefix that is a module of
/// `modules` (`None` when it leaves the crate or names nothing known).
fn resolve(
    from: &Module,
    segments: &[String],
    aliases: &BTreeMap<String, Module>,
    modules: &BTreeSet<Module>,
) -> Option<Module> {
    let mut rest = segments;
    let mut base: Module = match rest.first()?.as_str() {
        "crate" => {
            rest = &rest[1..];
            Vec::new()
        }
        "self" => {
            rest = &rest[1..];
            from.clone()
        }
        "super" => {
            let mut b = from.clone();
            while rest.first().is_some_and(|s| s == "super") {
                b.pop()?;
                rest = &rest[1..];
            }
            b
        }
        name => {
            rest = &rest[1..];
            aliases.get(name)?.clone()
        }
    };
    let mut best = modules.contains(&base).then(|| base.clone());
    for seg in rest {
        if seg == "self" {
            break;
        }
        base.push(seg.clone());
        if modules.contains(&base) {
            best = Some(base.clone());
        } else {
            break;
        }
    }
    best
}

/// The modules file module `from` refers to, with the line of the first reference to each.
fn references(from: &Module, src: &str, modules: &BTreeSet<Module>) -> BTreeMap<Module, usize> {
    let mut c = strip_comments_and_literals(src);
    strip_cfg_test(&mut c);
    let roots: Vec<String> = ["crate", "super", "self"].map(String::from).to_vec();
    let no_aliases = BTreeMap::new();
    let mut out: BTreeMap<Module, usize> = BTreeMap::new();
    let mut aliases: BTreeMap<String, Module> = BTreeMap::new();
    for p in find_paths(&c, &roots) {
        let Some(m) = resolve(from, &p.segments, &no_aliases, modules) else {
            continue;
        };
        // `use crate::grpc;` / `use crate::pg::values::{self, Cell}`: later `grpc::write::X`
        // and `values::f` name those modules.
        if p.in_use && full_path(from, &p.segments) == m {
            let name = p
                .alias
                .clone()
                .or_else(|| p.segments.iter().rev().find(|s| *s != "self").cloned());
            if let Some(name) = name.filter(|n| !["crate", "super", "self"].contains(&n.as_str())) {
                aliases.insert(name, m.clone());
            }
        }
        out.entry(m).or_insert(p.line);
    }
    let alias_roots: Vec<String> = aliases.keys().cloned().collect();
    if !alias_roots.is_empty() {
        for p in find_paths(&c, &alias_roots) {
            if let Some(m) = resolve(from, &p.segments, &aliases, modules) {
                out.entry(m).or_insert(p.line);
            }
        }
    }
    out
}

/// The absolute module path `segments` spells from `from` (no lookup; `self` dropped).
fn full_path(from: &Module, segments: &[String]) -> Module {
    let mut out = from.clone();
    let mut it = segments.iter().peekable();
    match it.peek().map(|s| s.as_str()) {
        Some("crate") => {
            out.clear();
            it.next();
        }
        Some("self") => {
            it.next();
        }
        _ => {}
    }
    while it.peek().is_some_and(|s| *s == "super") {
        out.pop();
        it.next();
    }
    out.extend(it.filter(|s| *s != "self").cloned());
    out
}

// ---------------------------------------------------------------------------------------------
// Graphs and cycles

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".to_string()
    } else {
        m.join("::")
    }
}

/// The file-level graph and the top-level graph of the crate under `src`.
fn graphs(src: &Path) -> (Graph, Graph) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut by_module: Vec<(Module, PathBuf)> = Vec::new();
    for f in files {
        if let Some(m) = module_of(f.strip_prefix(src).expect("under src")) {
            by_module.push((m, f));
        }
    }
    let modules: BTreeSet<Module> = by_module.iter().map(|(m, _)| m.clone()).collect();
    let mut file_graph = Graph::new();
    let mut top_graph = Graph::new();
    for (from, path) in &by_module {
        let text = std::fs::read_to_string(path).expect("read source");
        let shown = format!(
            "src/{}",
            path.strip_prefix(src).expect("under src").display()
        );
        for (to, line) in references(from, &text, &modules) {
            // A module's own descendants (and itself) are its business, not a dependency.
            if to.starts_with(from) {
                continue;
            }
            let site = (shown.clone(), line);
            file_graph
                .entry(name(from))
                .or_default()
                .entry(name(&to))
                .or_insert_with(|| site.clone());
            if let (Some(a), Some(b)) = (from.first(), to.first()) {
                if a != b {
                    top_graph
                        .entry(a.clone())
                        .or_default()
                        .entry(b.clone())
                        .or_insert(site);
                }
            }
        }
    }
    (file_graph, top_graph)
}

/// One cycle per strongly connected component with more than one module (Tarjan), each as
/// a path that starts and ends at the same module, with all the modules of its component.
fn cycles(g: &Graph) -> Vec<(Vec<String>, Vec<String>)> {
    struct Tarjan<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        sccs: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.g.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                self.sccs.push(scc);
            }
        }
    }
    let mut t = Tarjan {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        sccs: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    let mut out = Vec::new();
    for scc in t.sccs.iter().filter(|s| s.len() > 1) {
        let members: BTreeSet<&str> = scc.iter().copied().collect();
        let start = *members.iter().next().expect("non-empty");
        out.push((
            shortest_cycle(g, start, &members),
            members.iter().map(|m| m.to_string()).collect(),
        ));
    }
    out.sort();
    out
}

/// The shortest path from `start` back to `start` inside `members` (breadth first).
fn shortest_cycle(g: &Graph, start: &str, members: &BTreeSet<&str>) -> Vec<String> {
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !members.contains(w) || prev.contains_key(w) {
                continue;
            }
            prev.insert(w, v);
            if w == start {
                let mut path = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    path.push(at.to_string());
                    at = prev[at];
                }
                path.push(start.to_string());
                path.reverse();
                return path;
            }
            queue.push_back(w);
        }
    }
    unreachable!("a strongly connected component has a cycle through each member")
}

/// A cycle with the reference behind each step, for the failure message.
fn describe(g: &Graph, (cycle, component): &(Vec<String>, Vec<String>)) -> String {
    let mut s = format!("  {}\n", cycle.join(" -> "));
    if component.len() + 1 > cycle.len() {
        s.push_str(&format!(
            "    (all modules in this knot: {})\n",
            component.join(", ")
        ));
    }
    for pair in cycle.windows(2) {
        let (file, line) = &g[&pair[0]][&pair[1]];
        s.push_str(&format!(
            "    {} -> {}  ({file}:{line})\n",
            pair[0], pair[1]
        ));
    }
    s
}

fn assert_acyclic(what: &str, g: &Graph) {
    let found = cycles(g);
    if !found.is_empty() {
        let list: String = found.iter().map(|c| describe(g, c)).collect();
        panic!(
            "{} module cycle(s) among the node's {what} (see the module docs and \
             docs/architecture.md for which way the dependencies go):\n{list}",
            found.len()
        );
    }
}

fn node_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_cycles_between_file_modules() {
    let (files, _) = graphs(&node_src());
    assert!(files.len() > 10, "found too few modules: {files:?}");
    assert_acyclic("file modules", &files);
}

#[test]
fn no_cycles_between_top_level_modules() {
    let (_, top) = graphs(&node_src());
    assert!(top.len() > 3, "found too few top-level modules: {top:?}");
    assert_acyclic("top-level modules", &top);
}

/// Prints both graphs (for docs/architecture.md or a review):
/// `cargo test -p raftpg-node --test module_graph -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_module_graph() {
    let (files, top) = graphs(&node_src());
    for (title, g) in [("file modules", &files), ("top-level modules", &top)] {
        println!("{title}:");
        for (from, to) in g {
            let to: Vec<&str> = to.keys().map(String::as_str).collect();
            println!("  {from} -> {}", to.join(", "));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checker's own tests, on tiny inputs

fn mods(list: &[&str]) -> BTreeSet<Module> {
    list.iter()
        .map(|m| {
            if m.is_empty() {
                Vec::new()
            } else {
                m.split("::").map(String::from).collect()
            }
        })
        .collect()
}

fn refs(from: &str, src: &str, modules: &[&str]) -> Vec<String> {
    let from: Module = from.split("::").map(String::from).collect();
    references(&from, src, &mods(modules))
        .keys()
        .map(name)
        .collect()
}

const MODULES: &[&str] = &[
    "",
    "apply",
    "apply::applier",
    "apply::state_machine",
    "grpc",
    "grpc::write",
    "pg",
    "pg::values",
    "server",
    "sql",
    "sql::gate",
    "sql::session_rules",
];

#[test]
fn files_map_to_modules() {
    assert_eq!(
        module_of(Path::new("apply/state_machine.rs")),
        Some(vec!["apply".to_string(), "state_machine".to_string()])
    );
    assert_eq!(
        module_of(Path::new("grpc/mod.rs")),
        Some(vec!["grpc".to_string()])
    );
    assert_eq!(module_of(Path::new("lib.rs")), Some(vec![]));
    assert_eq!(module_of(Path::new("main.rs")), None);
}

#[test]
fn paths_resolve_to_the_deepest_file_module() {
    assert_eq!(
        refs(
            "server",
            "use crate::apply::state_machine::{ApplyLimits, Parts};\nfn f() { crate::sql::gate::prepare(x); }",
            MODULES
        ),
        ["apply::state_machine", "sql::gate"]
    );
    // An item of a folder's mod.rs: the folder module.
    assert_eq!(
        refs("server", "use crate::grpc::not_leader;", MODULES),
        ["grpc"]
    );
    assert_eq!(refs("server", "use crate::Thing;", MODULES), ["crate"]);
}

#[test]
fn use_trees_are_expanded() {
    assert_eq!(
        refs(
            "server",
            "use crate::{\n  sql::{gate, session_rules::Rule},\n  pg::values::{self, Cell},\n};",
            MODULES
        ),
        ["pg::values", "sql::gate", "sql::session_rules"]
    );
    assert_eq!(refs("server", "use crate::sql::*;", MODULES), ["sql"]);
}

#[test]
fn super_and_self_are_relative() {
    assert_eq!(
        refs(
            "apply::applier",
            "use super::state_machine::ApplyLimits;",
            MODULES
        ),
        ["apply::state_machine"]
    );
    assert_eq!(
        refs("apply::applier", "use super::super::server::X;", MODULES),
        ["server"]
    );
    assert_eq!(
        refs("grpc", "use self::write::W;", MODULES),
        ["grpc::write"]
    );
}

#[test]
fn imported_modules_count_where_used() {
    assert_eq!(
        refs(
            "server",
            "use crate::grpc;\nfn f() { grpc::write::WriteService::new(); }",
            MODULES
        ),
        ["grpc", "grpc::write"]
    );
    assert_eq!(
        refs(
            "server",
            "use crate::sql::gate as determinism;\nfn f() { determinism::f(); }",
            MODULES
        ),
        ["sql::gate"]
    );
    // Not an alias: a path segment or a longer identifier with the same ending.
    assert_eq!(
        refs(
            "server",
            "use crate::pg::values::{self, Cell};\nfn f() { x::values::g(); my_values::h(); }",
            MODULES
        ),
        ["pg::values"]
    );
}

#[test]
fn comments_literals_and_tests_do_not_count() {
    let src = r##"
//! See [`crate::apply::applier`].
/* crate::grpc::write */
const S: &str = "crate::server::X";
const R: &str = r#"crate::server::Y "quoted" "#;
const C: char = '"';
fn f<'a>(x: &'a str) { crate::sql::gate::g(x) }
macro_rules! m { () => { $crate::server::Z } }
#[cfg(test)]
mod tests {
    use crate::server::NodeContext;
    fn braces() { let _ = "{"; }
}
#[cfg(test)]
use crate::grpc::write;
fn after() { crate::pg::values::v() }
"##;
    assert_eq!(
        refs("apply::applier", src, MODULES),
        ["pg::values", "sql::gate"]
    );
}

#[test]
fn lines_are_reported() {
    let modules = mods(MODULES);
    let from = vec!["server".to_string()];
    let got = references(&from, "// one\n\nuse crate::sql::gate;\n", &modules);
    assert_eq!(
        got.get(&vec!["sql".to_string(), "gate".to_string()]),
        Some(&3)
    );
}

fn cycle_paths(g: &Graph) -> Vec<Vec<String>> {
    cycles(g).into_iter().map(|(path, _)| path).collect()
}

#[test]
fn cycles_are_found_with_their_path() {
    let mut g = Graph::new();
    let site = ("src/x.rs".to_string(), 1);
    for (a, b) in [
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("f", "a"),
    ] {
        g.entry(a.to_string())
            .or_default()
            .insert(b.to_string(), site.clone());
    }
    assert_eq!(
        cycle_paths(&g),
        [vec!["a", "b", "c", "a"], vec!["d", "e", "d"]]
            .map(|c| c.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    );
    assert!(describe(&g, &cycles(&g)[1]).contains("d -> e  (src/x.rs:1)"));
    // A component with more modules than its shortest cycle lists them all.
    g.entry("b".to_string())
        .or_default()
        .insert("a".to_string(), site.clone());
    assert_eq!(cycle_paths(&g)[0], ["a", "b", "a"]);
    assert!(describe(&g, &cycles(&g)[0]).contains("all modules in this knot: a, b, c"));
    g.get_mut("b").expect("edge").remove("a");
    g.get_mut("e").expect("edge").remove("d");
    g.get_mut("c").expect("edge").remove("a");
    assert!(cycles(&g).is_empty());
}

#[test]
fn descendants_are_not_dependencies() {
    // A folder's mod.rs using its children, and a child using the folder: no cycle.
    let dir = std::env::temp_dir().join(format!("module_graph_test_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("grpc")).expect("mkdir");
    std::fs::write(dir.join("lib.rs"), "pub mod grpc;\npub mod server;\n").expect("write");
    std::fs::write(
        dir.join("grpc/mod.rs"),
        "pub mod write;\npub use write::W;\nfn f() { self::write::g() }\n",
    )
    .expect("write");
    std::fs::write(dir.join("grpc/write.rs"), "use crate::grpc::helper;\n").expect("write");
    std::fs::write(dir.join("server.rs"), "use crate::grpc;\n").expect("write");
    let (files, top) = graphs(&dir);
    assert!(cycles(&files).is_empty(), "{files:?}");
    assert!(cycles(&top).is_empty(), "{top:?}");
    // Now grpc::write uses server: a cycle at file level and at top level.
    std::fs::write(
        dir.join("grpc/write.rs"),
        "use crate::grpc::helper;\nuse crate::server::S;\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("server.rs"),
        "use crate::grpc;\nfn f() { grpc::write::W::new() }\n",
    )
    .expect("write");
    let (files, top) = graphs(&dir);
    assert_eq!(
        cycle_paths(&files),
        [vec![
            "grpc::write".to_string(),
            "server".to_string(),
            "grpc::write".to_string()
        ]]
    );
    assert_eq!(
        cycle_paths(&top),
        [vec![
            "grpc".to_string(),
            "server".to_string(),
            "grpc".to_string()
        ]]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
