//! The layout rules of DESIGN.md section 2, checked on the source tree: the top-level modules import each other
//! without a circle, and so do the files of each folder; the leaves stay leaves; and no file in `src/` grows much
//! past 600 lines.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// "No file in `src/` much over 600 lines."
const MAX_LINES: usize = 650;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to: `src/audit/writer.rs` and `src/audit.rs` are both `audit`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The file's code without its unit tests: test code may use any module (a test builds its input with the
/// development tools), so it is not part of the dependency graph.
fn production_code(path: &Path) -> String {
    // A `tests.rs` module, and the modules under a `tests/` folder of `src/`, are tests.
    let in_tests = path
        .strip_prefix(src())
        .is_ok_and(|p| p.components().any(|c| c.as_os_str() == "tests"));
    if in_tests || path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The crate's top-level modules each module names with `crate::`, including `use crate::{a, b::c}` lists.
fn imports(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let end = list.find('}').unwrap_or(list.len());
            for item in list[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found.retain(|m| modules.contains(m));
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let mut uses = imports(&production_code(file), &modules);
        uses.remove(&module);
        graph.entry(module).or_default().extend(uses);
    }
    graph
}

/// A circle through `start`, if there is one, as the path of module names.
fn circle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let graph = graph();
    // The scan must see the known edges, or it would pass on anything.
    assert!(graph["proxy"].contains("policy"), "{graph:?}");
    assert!(graph["app"].contains("server"), "{graph:?}");
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle_through(&graph, m))
        .map(|path| path.join(" -> "))
        .collect();
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_leaves_stay_leaves() {
    let graph = graph();
    // `ids`, `clock`, `hex` and `json_writer` depend on nothing in the crate (the writer only on `hex`); `ssp`
    // parses with `ids` only.
    assert_eq!(graph["json_writer"], BTreeSet::from(["hex".to_owned()]));
    for leaf in ["ids", "clock", "hex"] {
        assert!(graph[leaf].is_empty(), "{leaf} imports {:?}", graph[leaf]);
    }
    assert_eq!(graph["ssp"], BTreeSet::from(["ids".to_owned()]));
    // The OperationOutcome bodies use nothing of the crate, not even their own folder.
    let outcome = production_code(&src().join("proxy/operation_outcome.rs"));
    assert!(
        !outcome.contains("crate::") && !outcome.contains("super::"),
        "proxy/operation_outcome.rs imports from the crate"
    );
}

/// A file's module path: `src/audit/writer/slot.rs` is `audit::writer::slot`, `src/audit/mod.rs` is `audit`.
fn module_path(path: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// The module paths a file's code names, through `crate::a::b` and `super::super::c` (braced lists included),
/// resolved against the file's own path.
fn named_paths(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let ident = |text: &str| -> String {
        text.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while at < code.len() {
        let rest = &code[at..];
        let (base, after): (Vec<String>, &str) = if let Some(r) = rest.strip_prefix("crate::") {
            (Vec::new(), r)
        } else if rest.starts_with("super::")
            && (at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b':'))
        {
            let mut r = rest;
            let mut up = 0;
            while let Some(next) = r.strip_prefix("super::") {
                r = next;
                up += 1;
            }
            (own[..own.len().saturating_sub(up)].to_vec(), r)
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let heads: Vec<String> = match after.strip_prefix('{') {
            Some(list) => list[..list.find('}').unwrap_or(list.len())]
                .split(',')
                .map(|item| ident(item.trim()))
                .collect(),
            None => vec![ident(after)],
        };
        for head in heads.into_iter().filter(|h| !h.is_empty()) {
            let mut path = base.clone();
            path.push(head);
            found.push(path);
        }
        at += rest.len() - after.len();
    }
    found
}

/// The code without its comment lines: a doc link (`[x](super::y)`) names a module without using it.
fn without_comments(code: &str) -> String {
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// For one folder of `src/`, which of its children (files and subfolders) name which others.
fn folder_graph(folder: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let prefix = module_path(&folder.join("mod.rs"));
    let mut files = Vec::new();
    rust_files(folder, &mut files);
    let children: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(f).get(prefix.len()).cloned())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let own = module_path(file);
        let Some(child) = own.get(prefix.len()) else {
            continue;
        };
        for path in named_paths(&without_comments(&production_code(file)), &own) {
            if path.len() > prefix.len()
                && path[..prefix.len()] == prefix[..]
                && children.contains(&path[prefix.len()])
                && path[prefix.len()] != *child
            {
                graph
                    .entry(child.clone())
                    .or_default()
                    .insert(path[prefix.len()].clone());
            }
        }
        graph.entry(child.clone()).or_default();
    }
    graph
}

#[test]
fn the_files_of_each_folder_import_each_other_without_a_circle() {
    let mut folders = Vec::new();
    let mut walk = vec![src()];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && path.file_name().is_some_and(|n| n != "tests") {
                walk.push(path.clone());
                folders.push(path);
            }
        }
    }
    // The scan must see known edges inside a folder, or it would pass on anything.
    let proxy = folder_graph(&src().join("proxy"));
    assert!(proxy["pipeline"].contains("refusal"), "{proxy:?}");
    let audit = folder_graph(&src().join("audit"));
    assert!(audit["writer"].contains("segment"), "{audit:?}");
    let mut circles = Vec::new();
    for folder in &folders {
        let graph = folder_graph(folder);
        for child in graph.keys() {
            if let Some(path) = circle_through(&graph, child) {
                circles.push(format!("{}: {}", folder.display(), path.join(" -> ")));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "import circles between files of one folder:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_path_scanner_resolves_super_and_crate() {
    let own: Vec<String> = ["audit", "writer", "slot"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let code =
        "use super::stage::X;\nuse super::super::{segment, record::Y};\nlet a = crate::ids::hex();";
    let found = named_paths(code, &own);
    let want: Vec<Vec<String>> = [
        vec!["audit", "writer", "stage"],
        vec!["audit", "segment"],
        vec!["audit", "record"],
        vec!["ids"],
    ]
    .iter()
    .map(|p| p.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(found, want);
}

#[test]
fn no_source_file_is_much_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_scanner_finds_braced_and_plain_imports() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let code = "use crate::a::X;\nuse crate::{b, c::Y};\nlet z = crate::e::f();";
    assert_eq!(
        imports(code, &modules),
        BTreeSet::from(["a".to_owned(), "b".to_owned(), "c".to_owned()])
    );
}

#[test]
fn the_audit_writer_never_waits_by_sleeping() {
    let mut files = Vec::new();
    rust_files(&src().join("audit"), &mut files);
    assert!(files.len() > 3, "{files:?}");
    for file in files {
        let code = production_code(&file);
        for pattern in ["thread::sleep", "time::sleep", "sleep("] {
            assert!(
                !code.contains(pattern),
                "{}: `{pattern}`: the audit writer waits on notifications, never on a sleep",
                file.display()
            );
        }
    }
}
