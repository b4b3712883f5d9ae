//! The documentation cannot drift from the code: every example in `README.md` and `docs/*.md` is checked. Config
//! examples are validated by the config reader (a fragment on top of the smallest valid config), policy examples by
//! the policy compiler, JSON examples parsed, Prometheus rule files checked by `promtool check rules`, every `ssp`
//! command line (in a shell block, or inside `$(...)`) parsed by the CLI, every repository file a command names
//! exists, and every relative link and anchor resolves.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// The repository root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `README.md` and every `docs/*.md`.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let mut guides: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    docs.extend(guides);
    docs
}

/// One fenced code block: its info string, its first line's number, its text.
struct Block {
    lang: String,
    line: usize,
    text: String,
}

fn blocks(doc: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(doc).unwrap();
    let mut found = Vec::new();
    let mut open: Option<(String, usize, Vec<&str>)> = None;
    for (n, line) in text.lines().enumerate() {
        match (line.strip_prefix("```"), open.take()) {
            (Some(_), Some((lang, at, body))) => found.push(Block {
                lang,
                line: at,
                text: body.join("\n"),
            }),
            (Some(info), None) => open = Some((info.trim().to_owned(), n + 2, Vec::new())),
            (None, Some((lang, at, mut body))) => {
                body.push(line);
                open = Some((lang, at, body));
            }
            (None, None) => {}
        }
    }
    assert!(
        open.is_none(),
        "{}: a code block is not closed",
        doc.display()
    );
    found
}

/// The smallest config `ssp` accepts; an example fragment is laid over it.
const MINIMAL: &str = r#"
[server]
cert = "c.crt"
key = "c.key"
client_ca = ["ca.crt"]
[upstream]
cert = "u.crt"
key = "u.key"
ca = ["ca.crt"]
"#;

/// `over` laid over `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn is_policy(table: &toml::Table) -> bool {
    ["system", "endpoint", "agreement", "supplier"]
        .iter()
        .any(|k| table.contains_key(*k))
}

#[test]
fn config_and_policy_examples_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = (0, 0);
    for doc in documents() {
        for block in blocks(&doc).into_iter().filter(|b| b.lang == "toml") {
            let place = format!("{}:{}", doc.display(), block.line);
            let table: toml::Table =
                toml::from_str(&block.text).unwrap_or_else(|e| panic!("{place}: not TOML: {e}"));
            if is_policy(&table) {
                let source =
                    ssp::policy::Source::from_files(vec![(place.clone(), block.text.clone())]);
                // The key files an example names are the operator's, not in the repository.
                if let Err(problems) = ssp::policy::Policy::compile(&source, 0)
                    && !problems
                        .problems
                        .iter()
                        .all(|p| p.contains("not found or unreadable in the policy folder"))
                {
                    panic!("{place}: the policy example does not compile:\n{problems}");
                }
                checked.1 += 1;
            } else {
                let mut config: toml::Table = toml::from_str(MINIMAL).unwrap();
                merge(&mut config, table);
                let path = dir.path().join("ssp.toml");
                std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
                if let Err(problems) = ssp::config::Config::load(&path) {
                    panic!("{place}: the config example does not validate:\n{problems}");
                }
                checked.0 += 1;
            }
        }
    }
    assert!(
        checked.0 >= 2 && checked.1 >= 2,
        "examples checked (config, policy): {checked:?}"
    );
}

#[test]
fn json_examples_parse() {
    let mut checked = 0;
    for doc in documents() {
        for block in blocks(&doc).into_iter().filter(|b| b.lang == "json") {
            let value: serde_json::Value = serde_json::from_str(&block.text)
                .unwrap_or_else(|e| panic!("{}:{}: not JSON: {e}", doc.display(), block.line));
            assert!(value.is_object(), "{}:{}", doc.display(), block.line);
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

/// Words of a shell command line: whitespace-separated, with '...' and "..." kept whole (quotes removed).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                any = false;
            }
            (None, c) => word.push(c),
        }
    }
    if any || !word.is_empty() {
        out.push(word);
    }
    out
}

/// The command lines of a shell block: continuation lines joined, comments cut, split at `&&`, `||`, `|` and `;`,
/// and the commands inside `$(...)` as lines of their own.
fn command_lines(block: &str) -> Vec<String> {
    let joined = block.replace("\\\n", " ");
    let mut lines = Vec::new();
    for line in joined.lines() {
        let line = match line.find(" #") {
            Some(at) => &line[..at],
            None => line,
        };
        if line.trim_start().starts_with('#') {
            continue;
        }
        let mut rest = line.to_owned();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').map_or(rest.len(), |e| start + e);
            lines.push(rest[start + 2..end].to_owned());
            rest.replace_range(start..(end + 1).min(rest.len()), "SUBSTITUTED");
        }
        for part in rest
            .split("&&")
            .flat_map(|p| p.split("||"))
            .flat_map(|p| p.split(['|', ';']))
        {
            if !part.trim().is_empty() {
                lines.push(part.trim().to_owned());
            }
        }
    }
    lines
}

/// The arguments after the `ssp` program in a command line, if it runs ssp.
fn ssp_args(words: &[String]) -> Option<Vec<String>> {
    let mut at = 0;
    // `sudo -u ssp ssp ...`, `VAR=value ssp ...`
    while at < words.len() && (words[at] == "sudo" || words[at].contains('=') || words[at] == "-u")
    {
        at += if words[at] == "-u" { 2 } else { 1 };
    }
    let program = words.get(at)?;
    if program == "ssp" || program.ends_with("/ssp") {
        return Some(words[at + 1..].to_vec());
    }
    let cargo_run = ["cargo", "run", "--release", "--"];
    if words[at..].starts_with(&cargo_run.map(String::from)) {
        return Some(words[at + cargo_run.len()..].to_vec());
    }
    None
}

#[test]
fn every_ssp_command_line_parses_and_every_named_file_exists() {
    let mut parsed = 0;
    let folders = [
        "systemd/",
        "docs/",
        "benches/",
        "fuzz/",
        "certs-dev/",
        "policies/",
    ];
    for doc in documents() {
        for block in blocks(&doc).into_iter().filter(|b| b.lang == "sh") {
            let place = format!("{}:{}", doc.display(), block.line);
            for line in command_lines(&block.text) {
                let words = words(&line);
                if let Some(args) = ssp_args(&words) {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    if let Err(e) = ssp::cli::parses(&args) {
                        panic!("{place}: `{line}` is not a command ssp accepts:\n{e}");
                    }
                    parsed += 1;
                }
                for word in words
                    .iter()
                    .filter(|w| folders.iter().any(|f| w.starts_with(f)))
                {
                    let exists = match word.strip_suffix("*.md") {
                        Some(folder) => root().join(folder).is_dir(),
                        None => root().join(word).exists() || word.starts_with("policies/sds"),
                    };
                    assert!(
                        exists,
                        "{place}: `{line}` names {word}, which is not in the repository"
                    );
                }
            }
        }
    }
    assert!(parsed >= 10, "only {parsed} ssp command lines found");
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(doc).unwrap();
    let mut in_code = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_code = !in_code;
            }
            !in_code && l.starts_with('#')
        })
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let file = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            assert!(
                file.exists(),
                "{}: link to {target}: no such file",
                doc.display()
            );
            if !fragment.is_empty() {
                assert!(
                    anchors(&file).iter().any(|a| a == fragment),
                    "{}: link to {target}: no such heading",
                    doc.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} links checked");
}

#[test]
fn the_shell_parsing_here_finds_ssp_commands() {
    let block = "sudo -u ssp ssp check-config --config /etc/ssp/ssp.toml   # comment\n\
                 curl -H \"Authorization: Bearer $(target/release/ssp dev-token --aud https://x/y)\" \\\n  https://z\n\
                 git diff && ssp policy import";
    let found: Vec<Vec<String>> = command_lines(block)
        .iter()
        .filter_map(|l| ssp_args(&words(l)))
        .collect();
    assert_eq!(
        found,
        [
            vec!["check-config", "--config", "/etc/ssp/ssp.toml"],
            vec!["dev-token", "--aud", "https://x/y"],
            vec!["policy", "import"],
        ]
        .map(|v| v.into_iter().map(String::from).collect::<Vec<_>>())
    );
    assert!(ssp::cli::parses(&["policy", "no-such-command"]).is_err());
}

/// `promtool`, or `None` outside CI when it is not installed (`.ci/run` installs Debian's `prometheus`).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed (.ci/run installs Debian's prometheus)"
        );
        eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
    }
    found
}

#[test]
fn prometheus_rule_examples_pass_promtool() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for doc in documents() {
        for block in blocks(&doc)
            .into_iter()
            .filter(|b| b.lang == "yaml" && b.text.contains("groups:"))
        {
            let path = dir.path().join(format!("rules-{checked}.yml"));
            std::fs::write(&path, &block.text).unwrap();
            let out = std::process::Command::new(&promtool)
                .args(["check", "rules"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}:{}: promtool check rules:\n{}{}",
                doc.display(),
                block.line,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no alert rules found in the documentation");
}

/// A sample output the documentation shows after "... prints:" is what the command named in that paragraph prints,
/// run from the repository root on the development config and policy.
#[test]
fn sample_outputs_are_what_the_commands_print() {
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            if !line.ends_with("prints:") || lines.get(n + 2) != Some(&"```") {
                continue;
            }
            // The command is the last `ssp ...` in backticks in the paragraph that ends here.
            let start = lines[..n]
                .iter()
                .rposition(|l| l.is_empty())
                .map_or(0, |p| p + 1);
            let paragraph = lines[start..=n].join(" ");
            let command = paragraph
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|c| c.starts_with("ssp "))
                .last()
                .unwrap_or_else(|| panic!("{}:{}: no `ssp ...` command", doc.display(), n + 1));
            let args = words(&command["ssp ".len()..]);
            let end = lines[n + 3..].iter().position(|l| *l == "```").unwrap() + n + 3;
            let expected = lines[n + 3..end].join("\n");
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ssp"))
                .args(&args)
                .current_dir(root())
                .output()
                .unwrap();
            let got = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                got.trim_end(),
                expected,
                "{}:{}: `{command}` prints something else",
                doc.display(),
                n + 1
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no sample output found");
}
