//! The layout rules of DESIGN.md section 2, checked on the source tree: the top-level modules import each other
//! without a circle, and no file in `src/` grows much past 600 lines.

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
    // `ids` and `outcome` depend on nothing in the crate; `ssp` parses with `ids` only.
    assert!(graph["ids"].is_empty(), "ids imports {:?}", graph["ids"]);
    assert!(
        graph["outcome"].is_empty(),
        "outcome imports {:?}",
        graph["outcome"]
    );
    assert_eq!(graph["ssp"], BTreeSet::from(["ids".to_owned()]));
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
