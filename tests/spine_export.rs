//! `ssp audit export --format spine`: golden output from a fixture log (`tests/fixtures/spine`), and every file
//! checked against the schema NHS England's `gpconnect-analytics` import loads it into (written below from that
//! repository, which the module doc of `ssp::audit::ship::spine` cites file by file).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};

use support::ssp_cmd;

/// A column of a staging or data table: its name in the file and what the import's SQL accepts in it.
struct Column {
    name: &'static str,
    check: fn(&str) -> bool,
}

/// `Import.SspTransactionStaging` (`V1.3__CreateImportTables.sql`, every column `varchar(1000)`), in its order,
/// with what `R__S011_Import.MigrateSspTransactionData.sql` and `Data.SspTransaction` (`V1.4`) then need.
const TRANSACTION_SCHEMA: [Column; 10] = [
    // convert(datetimeoffset, ...) after '+0000' -> '+00:00' and '+0100' -> '+01:00'; Splunk's %Q is milliseconds.
    Column {
        name: "_time",
        check: |v| splunk_time(v),
    },
    // FromAsid, ToAsid varchar(50).
    Column {
        name: "sspFrom",
        check: |v| v.len() <= 50 && v.bytes().all(|b| b.is_ascii_digit()),
    },
    Column {
        name: "sspTo",
        check: |v| v.len() <= 50 && v.bytes().all(|b| b.is_ascii_digit()),
    },
    Column {
        name: "SspTraceId",
        check: |v| v.len() <= 1000,
    },
    Column {
        name: "interaction",
        check: |v| v.is_empty() || v.starts_with("urn:nhs:names:services:") && v.len() <= 1000,
    },
    Column {
        name: "responseCode",
        check: |v| v.is_empty() || v.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c)),
    },
    // Duration decimal(8,3) NOT NULL.
    Column {
        name: "duration",
        check: |v| decimal_8_3(v),
    },
    // ResponseSize integer NULL.
    Column {
        name: "responseSize",
        check: |v| v.is_empty() || v.parse::<i32>().is_ok_and(|n| n >= 0),
    },
    Column {
        name: "responseErrorMessage",
        check: |v| v.len() <= 1000,
    },
    Column {
        name: "method",
        check: |v| ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&v),
    },
];

fn splunk_time(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 28
        && v.ends_with("+0000") | v.ends_with("+0100")
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23.. => true,
            _ => c.is_ascii_digit(),
        })
}

fn decimal_8_3(v: &str) -> bool {
    let Some((whole, frac)) = v.split_once('.') else {
        return !v.is_empty() && v.len() <= 5 && v.bytes().all(|b| b.is_ascii_digit());
    };
    !whole.is_empty()
        && whole.len() <= 5
        && frac.len() <= 3
        && (whole.to_owned() + frac)
            .bytes()
            .all(|b| b.is_ascii_digit())
}

/// `Import.AsidLookupStaging` (`V1.3`), with `Data.AsidLookup`'s sizes (`V1.4`) as `R__S010` maps them: name,
/// most characters, and whether a value is required (the ASID is the key).
const ASID_SCHEMA: [(&str, usize, bool); 7] = [
    ("ASID", 50, true),
    ("MName", 200, false),
    ("NACS", 20, false),
    ("OrgName", 200, false),
    ("OrgType", 50, false),
    ("PName", 200, false),
    ("PostCode", 10, false),
];

/// RFC 4180 as `bulk insert ... with (format = 'csv', fieldquote = '"', rowterminator = '0x0a')` reads it.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    assert!(!text.contains('\r'), "LF line ends only");
    let mut rows = Vec::new();
    let (mut row, mut cell, mut quoted, mut chars) =
        (Vec::new(), String::new(), false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') if cell.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(
        row.is_empty() && cell.is_empty(),
        "the file ends with a line end"
    );
    rows
}

/// `R__S009_Import.ParseFilePath.sql`: `gpcanalytics-TYPE-FROM-TO-INSTANCE-EXTRACTDATE.csv`, dates of 15
/// characters `yyyyMMddTHHmmss`, INSTANCE one of `Configuration.SplunkInstance`; and `Import.File`'s FROM < TO <
/// EXTRACTDATE (`R__S014_ApiReader.AddFile.sql`).
fn check_name(path: &Path, kind: &str) -> (String, String) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let parts: Vec<&str> = name.strip_suffix(".csv").unwrap().split('-').collect();
    assert_eq!(parts.len(), 6, "{name}");
    assert_eq!(parts[0], "gpcanalytics");
    assert_eq!(parts[1], kind);
    for date in [parts[2], parts[3], parts[5]] {
        assert_eq!(date.len(), 15, "{name}");
        assert!(date.bytes().enumerate().all(|(i, b)| if i == 8 {
            b == b'T'
        } else {
            b.is_ascii_digit()
        }));
    }
    assert!(
        ["cloud", "spinea", "spineb", "other"].contains(&parts[4]),
        "{name}"
    );
    assert!(parts[2] < parts[3] && parts[3] < parts[5], "{name}");
    (format!("{}-{}", parts[2], parts[3]), parts[4].to_owned())
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spine")
}

#[test]
fn the_spine_export_of_a_fixture_log_is_its_golden_output_in_the_import_schema() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ssp.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
cert = "unused.crt"
key = "unused.key"
client_ca = ["unused.crt"]

[upstream]
cert = "unused.crt"
key = "unused.key"
ca = ["unused.crt"]

[policy]
dir = "{f}/policies"
store = "{d}/store"

[audit]
dir = "{f}/audit"
"#,
            f = fixture().display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let args = |from: &str, to: &str, instance: &str| {
        vec![
            "audit".to_owned(),
            "export".into(),
            "--config".into(),
            config.display().to_string(),
            "--format".into(),
            "spine".into(),
            "--from".into(),
            from.into(),
            "--to".into(),
            to.into(),
            "--out".into(),
            out.display().to_string(),
            "--splunk-instance".into(),
            instance.into(),
        ]
    };
    let run = |a: Vec<String>| ssp_cmd(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (code, text) = run(args(
        "2026-11-02T00:00:00Z",
        "2026-11-03T00:00:00Z",
        "spinea",
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("8 transactions, 3 ASIDs"), "{text}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    let find = |prefix: &str| {
        files
            .iter()
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
            .unwrap()
            .clone()
    };
    let golden =
        |name: &str| std::fs::read_to_string(fixture().join("expected").join(name)).unwrap();

    let trans = find("gpcanalytics-ssptrans-");
    assert_eq!(
        check_name(&trans, "ssptrans"),
        ("20261102T000000-20261103T000000".into(), "spinea".into())
    );
    let text = std::fs::read_to_string(&trans).unwrap();
    assert_eq!(text, golden("ssptrans.csv"));
    let rows = parse_csv(&text);
    let header: Vec<&str> = TRANSACTION_SCHEMA.iter().map(|c| c.name).collect();
    assert_eq!(rows[0], header, "the staging table's columns, in its order");
    for row in &rows[1..] {
        assert_eq!(row.len(), header.len(), "{row:?}");
        for (column, value) in TRANSACTION_SCHEMA.iter().zip(row) {
            assert!(
                (column.check)(value),
                "{}: {value:?} in {row:?}",
                column.name
            );
        }
    }

    let lookup = find("gpcanalytics-asidlookup-");
    check_name(&lookup, "asidlookup");
    let text = std::fs::read_to_string(&lookup).unwrap();
    assert_eq!(text, golden("asidlookup.csv"));
    let rows = parse_csv(&text);
    assert_eq!(
        rows[0],
        ASID_SCHEMA.iter().map(|(n, ..)| *n).collect::<Vec<_>>()
    );
    for row in &rows[1..] {
        assert_eq!(row.len(), ASID_SCHEMA.len());
        for ((name, max, required), value) in ASID_SCHEMA.iter().zip(row) {
            assert!(
                value.chars().count() <= *max && (!required || !value.is_empty()),
                "{name}: {value:?}"
            );
        }
    }
    assert!(
        rows.iter().any(|r| r[3] == "THE SURGERY, \"HIGH STREET\""),
        "quotes and commas survive"
    );

    // One SSP0001 and, when the transaction ended, one SSP0004 event per transaction, joined by internalID.
    let events = std::fs::read_to_string(find("ssp-spine-events-")).unwrap();
    assert_eq!(events, golden("events.jsonl"));
    let mut starts = std::collections::BTreeMap::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = e["internalID"].as_str().unwrap().to_owned();
        *starts
            .entry((id, e["logReference"].as_str().unwrap().to_owned()))
            .or_insert(0) += 1;
    }
    assert_eq!(starts.keys().filter(|(_, r)| r == "SSP0001").count(), 8);
    assert_eq!(
        starts.keys().filter(|(_, r)| r == "SSP0004").count(),
        7,
        "one transaction has no end in the log"
    );
    assert!(starts.values().all(|n| *n == 1));
    // A refused request's headers as the consumer sent them (a formula, a URL, an NHS number) do not leave.
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for leak in ["9434765919", "evil.example", "cmd|"] {
            assert!(!text.contains(leak), "{}: {leak}", file.display());
        }
    }

    // Refused: a second extract of the same or an overlapping period (another extract date would count its
    // transactions twice), an instance the import does not know, an empty period, a time that is not RFC 3339.
    for (from, to) in [
        ("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z"),
        ("2026-11-02T12:00:00+01:00", "2026-11-04T00:00:00Z"),
    ] {
        let (code, text) = run(args(from, to, "spinea"));
        assert_eq!(code, 64, "{text}");
        assert!(
            text.contains("already holds an extract of a period that overlaps this one"),
            "{text}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        3,
        "nothing more written"
    );
    // The far end of time: no overflow (and a warning: the import refuses a period that has not ended). The next
    // period, in the same folder, is not an overlap.
    let (code, text) = run(args(
        "2026-11-03T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "cloud",
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 transactions"), "{text}");
    assert!(text.contains("warning: --to is after now"), "{text}");
    let (code, text) = run(args(
        "2026-11-02T00:00:00Z",
        "2026-11-03T00:00:00Z",
        "elsewhere",
    ));
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("cloud, spinea, spineb, other"), "{text}");
    let (code, text) = run(args(
        "2026-11-03T00:00:00Z",
        "2026-11-02T00:00:00Z",
        "other",
    ));
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("--from must be before --to"), "{text}");
    let (code, text) = run(args("2026-11-02", "2026-11-03T00:00:00Z", "other"));
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("--from: \"2026-11-02\" is not an RFC 3339 time"),
        "{text}"
    );
}
