//! `ssp audit export --format spine`: the log as NHS England's analytics reads the national SSP's transactions.
//!
//! Source: the public repository `nhsconnect/gpconnect-analytics` (read at 50bfa6a, June 2024).
//! - The national SSP logs each transaction as events joined by `internalID`. The Spine instances' extract takes
//!   the transaction from its `SSP0001` event to its `SSP0004` event (`README.md`: `transaction internalID
//!   startswith=SSP0001 endswith=SSP0004 maxspan=1h`), so ssp writes one `SSP0001` event when the request
//!   arrives and one `SSP0004` event when it ends (`ssp-spine-events-...jsonl`).
//! - The extract the import loads (`database/schema/V1.1__CreateConfigurationTables.sql`, the Splunk query; the
//!   staging table `Import.SspTransactionStaging` in `V1.3__CreateImportTables.sql`) has the columns `_time,
//!   sspFrom, sspTo, SspTraceId, interaction, responseCode, duration, responseSize, responseErrorMessage,
//!   method`, loaded by position (`R__F003_Import.CreateBulkInsertStatement.sql`: CSV, UTF-8, a header row,
//!   LF line ends). `_time` is `%Y-%m-%dT%H:%M:%S.%Q%z` with offset `+0000` or `+0100`
//!   (`R__S011_Import.MigrateSspTransactionData.sql`); `duration` is seconds with three decimals (`Duration
//!   decimal(8,3)`, `V1.4__CreateDataTables.sql`); `responseSize` an integer; `responseErrorMessage` `None` when
//!   there was no error, as in the repository's test data.
//! - The ASID lookup (`Import.AsidLookupStaging`): `ASID, MName, NACS, OrgName, OrgType, PName, PostCode`, which
//!   `R__S010_Import.MigrateAsidLookupData.sql` reads as ASID, supplier, ODS code, organisation name and type,
//!   product, postcode.
//! - File names (`R__S009_Import.ParseFilePath.sql`): `gpcanalytics-{ssptrans|asidlookup}-FROM-TO-INSTANCE-
//!   EXTRACTDATE.csv`, dates `yyyyMMddTHHmmss`, INSTANCE one of the import's `Configuration.SplunkInstance`
//!   names (`cloud`, `spinea`, `spineb`, `other`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::query::csv_line;
use crate::policy::Policy;

/// The ssptrans file's header, in the staging table's column order.
pub const TRANSACTION_COLUMNS: [&str; 10] = [
    "_time",
    "sspFrom",
    "sspTo",
    "SspTraceId",
    "interaction",
    "responseCode",
    "duration",
    "responseSize",
    "responseErrorMessage",
    "method",
];
/// The asidlookup file's header.
pub const ASID_COLUMNS: [&str; 7] = [
    "ASID", "MName", "NACS", "OrgName", "OrgType", "PName", "PostCode",
];
/// The import's names for where an extract came from.
pub const SPLUNK_INSTANCES: [&str; 4] = ["cloud", "spinea", "spineb", "other"];
/// A transaction is followed this long past the period for its end (the extract's `maxspan=1h`).
const MAX_SPAN: time::Duration = time::Duration::hours(1);

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub files: Vec<PathBuf>,
    pub transactions: u64,
    pub asids: u64,
    /// Lines of the log that are not records (a damaged log: `ssp audit verify` says where).
    pub unreadable: u64,
}

/// One transaction of the period, from its request and response records.
struct Transaction {
    internal_id: String,
    arrived: OffsetDateTime,
    trace_id: String,
    from: String,
    to: String,
    interaction: String,
    method: String,
    /// The refusal's error code, when refused.
    refusal: Option<String>,
    end: Option<End>,
}

struct End {
    at: OffsetDateTime,
    status: u64,
    seconds: f64,
    size: u64,
    outcome: String,
}

/// Writes the period `[from, to)`'s transactions (by arrival) of the log in `dir`, and the ASID lookup of
/// `policy`, into `out` (created if absent; a file of the same name is not overwritten). `instance` names the
/// extract's source in the file names (one of [`SPLUNK_INSTANCES`]); `extracted` is the extract date.
pub fn export(
    dir: &Path,
    policy: &Policy,
    from: OffsetDateTime,
    to: OffsetDateTime,
    instance: &str,
    extracted: OffsetDateTime,
    out: &Path,
) -> Result<Exported, String> {
    if !SPLUNK_INSTANCES.contains(&instance) {
        return Err(format!(
            "--splunk-instance {instance:?}: the import knows {}",
            SPLUNK_INSTANCES.join(", ")
        ));
    }
    if from >= to {
        return Err("--from must be before --to".into());
    }
    let mut unreadable = 0;
    let transactions = read_transactions(dir, policy, from, to, &mut unreadable)?;
    let stamp = |t: OffsetDateTime| {
        let t = t.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    };
    let period = format!("{}-{}-{instance}", stamp(from), stamp(to));
    let names = [
        format!("gpcanalytics-ssptrans-{period}-{}.csv", stamp(extracted)),
        format!("gpcanalytics-asidlookup-{period}-{}.csv", stamp(extracted)),
        format!("ssp-spine-events-{period}.jsonl"),
    ];
    let mut csv = format!("{}\n", TRANSACTION_COLUMNS.join(","));
    let mut events = String::new();
    for tx in &transactions {
        csv.push_str(&transaction_row(tx));
        for event in events_of(tx) {
            events.push_str(&event.to_string());
            events.push('\n');
        }
    }
    let (lookup, asids) = asid_lookup(policy);
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    // One extract a period: the import takes each file once, and a second extract of the same transactions (the
    // same period with another extract date, or an overlapping one) would count them twice.
    let entries = std::fs::read_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((f, t)) = period_of(&name)
            && f < to
            && from < t
        {
            return Err(format!(
                "{}: already holds an extract of a period that overlaps this one ({name}); give another folder",
                out.display()
            ));
        }
    }
    let mut files = Vec::new();
    for (name, text) in names.iter().zip([csv, lookup, events]) {
        let path = out.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(path);
    }
    Ok(Exported {
        files,
        transactions: transactions.len() as u64,
        asids,
        unreadable,
    })
}

/// The period of an export's file, from its name (`...-FROM-TO-INSTANCE...`, dates `yyyyMMddTHHmmss` in UTC).
fn period_of(name: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let rest = [
        "gpcanalytics-ssptrans-",
        "gpcanalytics-asidlookup-",
        "ssp-spine-events-",
    ]
    .iter()
    .find_map(|p| name.strip_prefix(p))?;
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]");
    let mut parts = rest.split('-');
    let mut date = || {
        time::PrimitiveDateTime::parse(parts.next()?, &format)
            .ok()
            .map(time::PrimitiveDateTime::assume_utc)
    };
    Some((date()?, date()?))
}

/// `2020-01-01T21:00:13.001+0000`: Splunk's `%Y-%m-%dT%H:%M:%S.%Q%z`, in UTC.
fn splunk_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}+0000",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The error message column: `None` for a transaction without error; the refusal's error code (never the detail
/// after it, which may quote the consumer's target); else the outcome; empty for a transaction with no end in
/// the log, as in the repository's test data.
fn error_message(tx: &Transaction) -> String {
    if let Some(code) = tx.refusal.as_ref().filter(|c| !c.is_empty()) {
        return code.clone();
    }
    match &tx.end {
        Some(end) if end.outcome == "ok" && tx.refusal.is_none() => "None".into(),
        Some(end) => end.outcome.clone(),
        None => String::new(),
    }
}

fn transaction_row(tx: &Transaction) -> String {
    let (code, duration, size) = match &tx.end {
        Some(end) => (
            end.status.to_string(),
            format!("{:.3}", end.seconds),
            end.size.to_string(),
        ),
        None => (String::new(), "0.000".into(), String::new()),
    };
    let time = splunk_time(tx.arrived);
    let message = error_message(tx);
    csv_line(&[
        &time,
        &tx.from,
        &tx.to,
        &tx.trace_id,
        &tx.interaction,
        &code,
        &duration,
        &size,
        &message,
        &tx.method,
    ])
}

/// The transaction's `SSP0001` (arrival) and `SSP0004` (end) events.
fn events_of(tx: &Transaction) -> Vec<Value> {
    let mut events = vec![json!({
        "_time": splunk_time(tx.arrived),
        "logReference": "SSP0001",
        "internalID": tx.internal_id,
        "SspTraceId": tx.trace_id,
        "sspFrom": tx.from,
        "sspTo": tx.to,
        "interaction": tx.interaction,
        "method": tx.method,
    })];
    if let Some(end) = &tx.end {
        events.push(json!({
            "_time": splunk_time(end.at),
            "logReference": "SSP0004",
            "internalID": tx.internal_id,
            "responseCode": end.status,
            "duration": format!("{:.3}", end.seconds),
            "responseSize": end.size,
            "responseErrorMessage": error_message(tx),
        }));
    }
    events
}

/// The directory's systems and endpoints, by ASID, as the ASID lookup file (a system's `name` stands in for a
/// missing `product`; an ASID in both is the system's row).
fn asid_lookup(policy: &Policy) -> (String, u64) {
    let row = |asid: &str, ods: &str, o: &crate::policy::Organisation, product: Option<&str>| {
        let cell = |v: &Option<String>| v.clone().unwrap_or_default();
        let product = o.product.as_deref().or(product).unwrap_or_default();
        csv_line(&[
            asid,
            &cell(&o.supplier),
            ods,
            &cell(&o.org_name),
            &cell(&o.org_type),
            product,
            &cell(&o.postcode),
        ])
    };
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for e in policy.endpoints() {
        let asid = e.asid.as_str();
        rows.insert(asid.to_owned(), row(asid, e.ods.as_str(), &e.org, None));
    }
    for s in policy.systems() {
        let asid = s.asid.as_str();
        rows.insert(
            asid.to_owned(),
            row(asid, s.ods.as_str(), &s.org, Some(&s.name)),
        );
    }
    let mut text = format!("{}\n", ASID_COLUMNS.join(","));
    let n = rows.len() as u64;
    for row in rows.into_values() {
        text.push_str(&row);
    }
    (text, n)
}

/// A refusal's error code without what follows it: the reasons end in values a consumer sent or the proxy was
/// given (an ASID, a URL: `ASID_CHECK_FAILED_MESSAGESENDER_200000000359`, `..._URL_https://...`), so the code is
/// the reason up to its first character that is not a letter, `_` or `-`, and before any `_http`, without a
/// trailing `_`. The header names (`MISSING_OR_INVALID_HEADER_Ssp-TraceID`) are the proxy's own and stay.
fn error_code(reason: &str) -> String {
    let end = reason
        .find(|c: char| !(c.is_ascii_alphabetic() || c == '_' || c == '-'))
        .unwrap_or(reason.len());
    let code = &reason[..end];
    let code = code.find("_http").map_or(code, |at| &code[..at]);
    code.trim_end_matches('_').to_owned()
}

/// A request record's `key` as the export may carry it: a record keeps what a refused consumer sent, and only a
/// well-formed value leaves the box (empty otherwise): a trace id that is a UUID, ASIDs the directory registers
/// (`Ssp-From` a system, `Ssp-To` an endpoint: a refused consumer may have put anything there, an NHS number), an
/// interaction that is a URN of NHS services (`urn:nhs:names:services:`, no more than 200 of `[A-Za-z0-9:._-]`),
/// a method of 1 to 16 capital letters. A header a consumer filled with a URL or an NHS number is not exported.
fn well_formed(record: &Value, key: &str, policy: &Policy) -> String {
    let v = record[key].as_str().unwrap_or("");
    let asid = || crate::ids::Asid::parse(v);
    let ok = match key {
        "trace_id" => uuid::Uuid::try_parse(v).is_ok() && v.len() == 36,
        "from" => asid().is_some_and(|a| policy.system(&a).is_some()),
        "to" => asid().is_some_and(|a| policy.endpoint(&a).is_some()),
        "interaction" => {
            v.starts_with("urn:nhs:names:services:")
                && v.len() <= 200
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b))
        }
        "method" => (1..=16).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_uppercase()),
        _ => false,
    };
    if ok { v.to_owned() } else { String::new() }
}

/// The transactions that arrived in `[from, to)`, in arrival order, each with its end when its response record
/// is within an hour past `to`. A response is paired with the oldest open request of its (instance, connection,
/// trace id).
fn read_transactions(
    dir: &Path,
    policy: &Policy,
    from: OffsetDateTime,
    to: OffsetDateTime,
    unreadable: &mut u64,
) -> Result<Vec<Transaction>, String> {
    let segments =
        crate::audit::segment_paths(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut done: Vec<Transaction> = Vec::new();
    let mut open: HashMap<String, VecDeque<usize>> = HashMap::new();
    let text = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_owned();
    'segments: for path in &segments {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                *unreadable += 1;
                continue;
            };
            let Some(at) = record["ts"]
                .as_str()
                .and_then(|ts| OffsetDateTime::parse(ts, &Rfc3339).ok())
            else {
                continue;
            };
            if to.checked_add(MAX_SPAN).is_some_and(|end| at >= end) {
                break 'segments;
            }
            let key = format!(
                "{}\u{0}{}\u{0}{}",
                record["instance"], record["conn_id"], record["trace_id"]
            );
            match record["kind"].as_str() {
                Some("request") if at >= from && at < to => {
                    let refusal = (record["decision"] == "deny")
                        .then(|| error_code(record["reason"].as_str().unwrap_or("")));
                    open.entry(key).or_default().push_back(done.len());
                    done.push(Transaction {
                        internal_id: format!("{}-{}", text(&record, "instance"), record["seq"]),
                        arrived: at,
                        trace_id: well_formed(&record, "trace_id", policy),
                        from: well_formed(&record, "from", policy),
                        to: well_formed(&record, "to", policy),
                        interaction: well_formed(&record, "interaction", policy),
                        method: well_formed(&record, "method", policy),
                        refusal,
                        end: None,
                    });
                }
                Some("response") => {
                    if let Some(queue) = open.get_mut(&key)
                        && let Some(i) = queue.pop_front()
                    {
                        done[i].end = Some(End {
                            at,
                            status: record["status"].as_u64().unwrap_or(0),
                            seconds: record["total_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                            size: record["bytes_out"].as_u64().unwrap_or(0),
                            outcome: text(&record, "outcome"),
                        });
                        if queue.is_empty() {
                            open.remove(&key);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    done.sort_by_key(|tx| tx.arrived);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_code_leaves_the_values_behind() {
        for (reason, code) in [
            (
                "ASID_CHECK_FAILED_MESSAGESENDER_9434765919",
                "ASID_CHECK_FAILED_MESSAGESENDER",
            ),
            (
                "RATE_LIMIT_EXCEEDED_MESSAGESENDER_200000000359",
                "RATE_LIMIT_EXCEEDED_MESSAGESENDER",
            ),
            (
                "ERROR_COMMUNICATING_TO_ENDPOINT_URL_https://gp.example/Patient?identifier=9434765919",
                "ERROR_COMMUNICATING_TO_ENDPOINT_URL",
            ),
            (
                "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
                "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
            ),
            (
                "INVALID_IDENTIFIER_VALUE: the Ssp-To header",
                "INVALID_IDENTIFIER_VALUE",
            ),
            ("405: Method Not Allowed", ""),
        ] {
            assert_eq!(error_code(reason), code, "{reason}");
        }
        let periods = period_of(
            "gpcanalytics-ssptrans-20261102T000000-20261103T000000-other-20261207T101046.csv",
        );
        assert_eq!(
            periods.map(|(f, t)| (f.unix_timestamp(), t.unix_timestamp())),
            Some((1_793_577_600, 1_793_664_000))
        );
        assert_eq!(period_of("notes.txt"), None);
    }
}
