//! The layout of src/ stays a pipeline: no import cycles, and the
//! dependencies that must run one way do.
//!
//! Read from the source text: every `crate::` and `super::` path outside
//! comments (`use` groups expanded) is an edge to the longest module it
//! names. A module's own ancestors are not counted (a child naming its
//! parent's items is how a module tree shares code). Cycles are looked for
//! among the children of each module, with each child standing for its whole
//! subtree: at the root that is the graph of the top-level modules.
//! `cargo test layout -- --nocapture` prints the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`models::gpt2`, "" for the root) -> its source text, for
/// every library file under src/ (the binary's main.rs is a crate of its own).
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut p = prefix.to_vec();
                match stem {
                    "main" if prefix.is_empty() => continue,
                    "lib" | "mod" => {}
                    other => p.push(other.to_string()),
                }
                out.insert(p.join("::"), std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The text without `//` comments (doc comments included).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths that start at `at` (just after `crate::` or `super::`): one
/// identifier chain, or several when it ends in a `{...}` group.
fn paths_at(s: &[u8], mut at: usize) -> Vec<Vec<String>> {
    let mut chain = Vec::new();
    loop {
        while at < s.len() && s[at] == b' ' {
            at += 1;
        }
        if at < s.len() && s[at] == b'{' {
            // A group: split at top-level commas, expand each.
            let mut depth = 0;
            let mut start = at + 1;
            let mut out = Vec::new();
            let mut i = at;
            while i < s.len() {
                match s[i] {
                    b'{' => depth += 1,
                    b'}' | b',' if depth == 1 => {
                        let part = std::str::from_utf8(&s[start..i]).unwrap().trim();
                        if !part.is_empty() && part != "self" {
                            let sub = format!("{part};");
                            for tail in paths_at(sub.as_bytes(), 0) {
                                let mut p = chain.clone();
                                p.extend(tail);
                                out.push(p);
                            }
                        }
                        start = i + 1;
                        if s[i] == b'}' {
                            break;
                        }
                    }
                    b'}' => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
            if out.is_empty() {
                out.push(chain);
            }
            return out;
        }
        let start = at;
        while at < s.len() && (s[at].is_ascii_alphanumeric() || s[at] == b'_') {
            at += 1;
        }
        if start == at {
            return vec![chain];
        }
        chain.push(std::str::from_utf8(&s[start..at]).unwrap().to_string());
        if s[at..].starts_with(b"::") {
            at += 2;
        } else {
            return vec![chain];
        }
    }
}

/// Edges module -> modules it names (not itself, not its ancestors).
fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in mods {
        let text = strip_comments(text);
        let s = text.as_bytes();
        let here: Vec<&str> = if m.is_empty() {
            vec![]
        } else {
            m.split("::").collect()
        };
        let set = out.entry(m.clone()).or_default();
        for (kw, base) in [
            ("crate::", Vec::new()),
            ("super::", here[..here.len().saturating_sub(1)].to_vec()),
        ] {
            let mut from = 0;
            while let Some(i) = text[from..].find(kw) {
                let at = from + i;
                from = at + kw.len();
                let before = if at == 0 { b' ' } else { s[at - 1] };
                if before.is_ascii_alphanumeric() || before == b'_' {
                    continue;
                }
                for tail in paths_at(s, from) {
                    let mut path: Vec<String> = base.iter().map(|x| x.to_string()).collect();
                    let mut best = None;
                    for seg in std::iter::once(None).chain(tail.iter().map(Some)) {
                        if let Some(seg) = seg {
                            path.push(seg.clone());
                        }
                        let name = path.join("::");
                        if mods.contains_key(&name) {
                            best = Some(name);
                        }
                    }
                    let Some(target) = best else { continue };
                    let ancestor =
                        target.is_empty() || *m == target || m.starts_with(&format!("{target}::"));
                    if !ancestor {
                        set.insert(target);
                    }
                }
            }
        }
    }
    out
}

/// The child of `parent` that `m` lies in (`m` itself when a direct child).
fn child_of(parent: &str, m: &str) -> Option<String> {
    let rest = if parent.is_empty() {
        m
    } else {
        m.strip_prefix(parent)?.strip_prefix("::")?
    };
    let first = rest.split("::").next().filter(|s| !s.is_empty())?;
    Some(if parent.is_empty() {
        first.to_string()
    } else {
        format!("{parent}::{first}")
    })
}

/// A cycle in `graph`, if any, as the list of its nodes.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n) {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// Every cycle among siblings, for each module with children.
fn sibling_cycles(
    mods: &BTreeMap<String, String>,
    e: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Vec<String>> {
    let mut cycles = Vec::new();
    for parent in mods.keys() {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, tos) in e {
            let Some(a) = child_of(parent, from) else {
                continue;
            };
            for to in tos {
                if let Some(b) = child_of(parent, to) {
                    if a != b {
                        graph.entry(a.clone()).or_default().insert(b);
                    }
                }
            }
        }
        if let Some(c) = find_cycle(&graph) {
            cycles.push(c);
        }
    }
    cycles
}

fn src_graph() -> (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>) {
    let mods = modules(&crate::repo().join("src"));
    let e = edges(&mods);
    (mods, e)
}

#[test]
fn src_has_no_import_cycle() {
    let (mods, e) = src_graph();
    assert!(
        mods.contains_key("kernels::attention") && mods.contains_key("trainers::online::engine")
    );
    for (m, tos) in &e {
        let lines = mods[m].lines().count();
        let name = if m.is_empty() { "(lib.rs)" } else { m.as_str() };
        let tos: Vec<&str> = tos.iter().map(String::as_str).collect();
        println!("{name:<28} {lines:>5} lines  -> {}", tos.join(" "));
    }
    let cycles = sibling_cycles(&mods, &e);
    println!("import cycles: {}", cycles.len());
    assert!(cycles.is_empty(), "import cycles in src/: {cycles:?}");
}

#[test]
fn dependencies_run_one_way() {
    let (_, e) = src_graph();
    let in_tree = |m: &str, top: &str| m == top || m.starts_with(&format!("{top}::"));
    for (m, tos) in &e {
        for to in tos {
            // The kernels sit below everything that computes.
            if in_tree(m, "kernels") {
                assert!(in_tree(to, "kernels"), "kernels import {to} (from {m})");
            }
            // The pipeline never imports the application.
            if !in_tree(m, "app") {
                assert!(!in_tree(to, "app"), "{m} imports the application ({to})");
            }
            // The RL math and the optimizer know no model, trainer or data.
            if in_tree(m, "rl") || in_tree(m, "optim") {
                for top in ["models", "trainers", "data", "generate", "app"] {
                    assert!(!in_tree(to, top), "{m} imports {to}");
                }
            }
        }
    }
}

#[test]
fn the_checker_sees_cycles_and_groups() {
    // A two-module cycle through a `use` group, and one through `super::`.
    let mods: BTreeMap<String, String> = [
        ("".into(), "pub mod a; pub mod b; pub mod c;".into()),
        ("a".into(), "use crate::{b::{X, Y}, error};".into()),
        ("b".into(), "fn f() { super::c::g(); } // crate::a".into()),
        ("c".into(), "use crate::a::Z;".into()),
    ]
    .into_iter()
    .collect();
    let e = edges(&mods);
    assert_eq!(e["a"], BTreeSet::from(["b".to_string()]));
    assert_eq!(
        e["b"],
        BTreeSet::from(["c".to_string()]),
        "comments are not read"
    );
    let cycles = sibling_cycles(&mods, &e);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert_eq!(cycles[0].len(), 4, "a -> b -> c -> a: {cycles:?}");
}
