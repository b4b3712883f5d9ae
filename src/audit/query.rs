//! `ssp audit query`: whole transactions matching a filter, as JSON lines or a table.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use super::segment::list_segments;

/// Filters of `ssp audit query`; all given ones must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub trace_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub interaction: Option<String>,
    /// RFC 3339 bounds on `ts`, inclusive.
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    pub outcome: Option<String>,
}

impl Filter {
    fn matches(&self, v: &serde_json::Value) -> bool {
        let eq = |key: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| v[key].as_str() == Some(w.as_str()))
        };
        let ts = || {
            v["ts"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
        };
        v["kind"] != "seal"
            && eq("trace_id", &self.trace_id)
            && eq("from", &self.from)
            && eq("to", &self.to)
            && eq("interaction", &self.interaction)
            && eq("outcome", &self.outcome)
            && self.since.is_none_or(|s| ts().is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| ts().is_some_and(|t| t <= u))
    }
}

/// Every record of every transaction that has a record matching `filter`, in log order. A transaction is the
/// request and response records sharing an instance, connection and trace id.
pub fn query(dir: &Path, filter: &Filter) -> io::Result<Vec<serde_json::Value>> {
    let key = |v: &serde_json::Value| {
        (
            v["instance"].to_string(),
            v["conn_id"].to_string(),
            v["trace_id"].to_string(),
        )
    };
    let mut wanted = std::collections::HashSet::new();
    for_each_record(dir, |v| {
        if filter.matches(&v) {
            wanted.insert(key(&v));
        }
    })?;
    let mut out = Vec::new();
    for_each_record(dir, |v| {
        if v["kind"] != "seal" && wanted.contains(&key(&v)) {
            out.push(v);
        }
    })?;
    Ok(out)
}

fn for_each_record(dir: &Path, mut f: impl FnMut(serde_json::Value)) -> io::Result<()> {
    for (_, path) in list_segments(dir)? {
        for line in BufReader::new(File::open(&path)?).lines() {
            if let Ok(v) = serde_json::from_str(&line?) {
                f(v);
            }
        }
    }
    Ok(())
}

/// One line of the table view.
pub fn table_row(v: &serde_json::Value) -> String {
    let s = |k: &str| cell(v[k].as_str().unwrap_or("-"));
    let interaction = s("interaction");
    let interaction = interaction
        .strip_prefix("urn:nhs:names:services:gpconnect:")
        .unwrap_or(&interaction)
        .to_owned();
    let result = match v["kind"].as_str() {
        Some("request") => format!(
            "{} {}",
            s("decision"),
            cell(v["reason"].as_str().unwrap_or(""))
        ),
        Some("selftest") => format!(
            "{} {} {}",
            s("verdict"),
            v["failed"],
            cell(v["reason"].as_str().unwrap_or(""))
        ),
        _ => format!(
            "{} {} {}B in {}B out {}ms",
            v["status"],
            s("outcome"),
            v["bytes_in"],
            v["bytes_out"],
            v["total_ms"]
        ),
    };
    format!(
        "{:<27} {:>6} {:<8} {:<36} {:<12} {:<12} {:<45} {:<6} {}",
        s("ts"),
        v["seq"],
        s("kind"),
        s("trace_id"),
        s("from"),
        s("to"),
        interaction,
        s("method"),
        result.trim_end()
    )
}

/// A record's text as a table cell for a terminal: control characters (C0, DEL, C1) and Unicode's bidirectional
/// controls are shown as `\u{..}` escapes. A refused request's values are recorded as the consumer sent them, and
/// shown raw they could move the cursor or reorder the operator's line (the "Trojan Source" attack, CVE-2021-42574).
/// `--json` output is JSON, escaped by its rules.
pub(crate) fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The bidirectional formatting characters of Unicode Standard Annex #9, section 2: marks, embeddings,
    // overrides and isolates.
    // With them the invisible format characters and the line and paragraph separators, which hide text or break
    // a line as surely: zero-width spaces and joiners, the word joiner and invisible operators, the byte order mark.
    let bidi = |c: char| {
        matches!(c, '\u{061c}' | '\u{feff}')
            || ('\u{200b}'..='\u{200f}').contains(&c)
            || ('\u{2028}'..='\u{202e}').contains(&c)
            || ('\u{2060}'..='\u{2069}').contains(&c)
    };
    for c in text.chars() {
        if c.is_control() || bidi(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// One CSV line (RFC 4180) with its line break: a cell with a comma, quote or line break is quoted, and a cell that
/// a spreadsheet would take for a formula (starting `=`, `+`, `-`, `@`, tab or carriage return; OWASP, "CSV
/// Injection") gets a leading `'`. Record text is what consumers sent.
pub(crate) fn csv_line(cells: &[&str]) -> String {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            let guarded = if c.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                format!("'{c}")
            } else {
                (*c).to_owned()
            };
            if guarded.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", guarded.replace('"', "\"\""))
            } else {
                guarded
            }
        })
        .collect();
    format!("{}\n", quoted.join(","))
}

pub const TABLE_HEADER: &str = "ts                             seq kind     trace_id                             from         to           interaction                                   method result";
