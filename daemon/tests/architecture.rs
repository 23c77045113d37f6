//! The daemon's architecture, checked from its source: the node core stays free
//! of I/O, and no two top-level modules depend on each other, directly or in a
//! circle. Both read `daemon/src`; neither runs the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A file's lines that are not comments (doc links name modules too).
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The code of a file without comments and without its test module.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("read");
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    without_comments(text)
}

#[test]
fn the_node_core_has_no_io_clock_or_randomness() {
    const FORBIDDEN: [&str; 7] = [
        "tokio",
        "std::net::UdpSocket",
        "UdpSocket",
        "Instant::now",
        "SystemTime",
        "rand::",
        "std::thread",
    ];
    let dir = src().join("node");
    let mut found = Vec::new();
    let mut checked = 0;
    for file in rust_files(&dir) {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Test-only modules (`#[cfg(test)] mod tests;`) drive the core with a clock.
        if name.starts_with("tests") || name == "testkit.rs" {
            continue;
        }
        checked += 1;
        let code = code(&file);
        for word in FORBIDDEN {
            if code.contains(word) {
                found.push(format!("{}: {word}", file.display()));
            }
        }
    }
    assert!(
        checked >= 5,
        "the node core's files were not found in {dir:?}"
    );
    assert!(
        found.is_empty(),
        "I/O in the node core:\n{}",
        found.join("\n")
    );
}

/// The top-level modules of `daemon/src` and the files of each.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules = BTreeMap::new();
    for entry in fs::read_dir(src()).expect("read_dir") {
        let path = entry.expect("entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        if path.is_dir() {
            modules.insert(stem, rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main" {
            modules.entry(stem).or_insert_with(Vec::new).push(path);
        }
    }
    modules
}

/// The top-level modules that `code` names through `crate::`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b};`: the first segment of each item at depth one.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        named.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            named.insert(ident(rest));
        }
    }
    named
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Who imports whom among the top-level modules.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    modules
        .iter()
        .map(|(name, files)| {
            let mut deps = BTreeSet::new();
            for file in files {
                let text = fs::read_to_string(file).expect("read");
                deps.extend(
                    crate_paths(&without_comments(&text))
                        .into_iter()
                        .filter(|d| d != name && modules.contains_key(d)),
                );
            }
            (name.clone(), deps)
        })
        .collect()
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_daemon_modules_import_each_other_directly_or_in_a_circle() {
    let graph = graph();
    assert!(graph.contains_key("node") && graph.contains_key("dataplane"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between daemon modules: {}", cycle.join(" → "));
    }
}

#[test]
fn the_cycle_finder_sees_a_cycle_and_grouped_imports() {
    assert_eq!(
        crate_paths("use crate::{a::X, b, c::{d, e}};\nuse crate::f::G;"),
        ["a", "b", "c", "f"].map(String::from).into_iter().collect()
    );
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert!(find_cycle(&g).is_some());
    g.get_mut("c").expect("c").clear();
    assert!(find_cycle(&g).is_none());
}
