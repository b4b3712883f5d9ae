//! What an evidence pack holds for a period, every file made from the log, the policy store and the config alone
//! (no clock is read: the same inputs give the same bytes):
//!
//! | file | what |
//! |---|---|
//! | `README.md` | what the pack shows and what it cannot |
//! | `period.json` | the period, the instance(s), the first and last record of the period (`seq`, `ts`, SHA-256 of the line: the chain heads) |
//! | `chain.json` | `ssp audit verify` of the whole log: intact (through the period's last record and beyond), or the first broken record |
//! | `policy/generations.json`, `policy/generation-N/...` | the policy generations in force in the period (import time, SHA-256) and their files |
//! | `transactions.csv` | transactions by consumer ASID, ODS code, interaction and outcome |
//! | `refusals.csv` | refused requests by reason |
//! | `certificates.json` | consumer certificates seen in the period; the proxy's own certificates and its CRLs, against the period |
//! | `subject-lookups.csv` | every `ssp audit subject` of the period (who, when, which HMAC) |

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::audit::query::csv_line;
use crate::config::Config;
use crate::policy::Policy;
use crate::policy::store::Store;

/// The period a pack covers, inclusive.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
}

impl Period {
    fn contains(&self, ts: &str) -> bool {
        OffsetDateTime::parse(ts, &Rfc3339).is_ok_and(|t| t >= self.from && t <= self.to)
    }
}

/// Every file of the pack for `period`, by its path in the pack.
pub fn contents(config: &Config, period: Period) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let dir = &config.audit.dir;
    let segments =
        crate::audit::segment_paths(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let policy = Policy::load_dir(&config.policy.dir, 0).ok();
    let mut files = BTreeMap::new();
    let mut tally = Tally::default();
    for path in &segments {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if let Ok(record) = serde_json::from_str::<Value>(&line)
                && record["ts"].as_str().is_some_and(|ts| period.contains(ts))
            {
                tally.add(&record, &line);
            }
        }
    }
    tally.close_open_transactions();
    let head = |h: &Option<Head>| {
        h.as_ref().map(|h| {
            let hash = crate::hex::HexDigest::of(h.line.as_bytes()).to_string();
            json!({"seq": h.seq, "ts": h.ts, "sha256": hash})
        })
    };
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    files.insert(
        "period.json".into(),
        pretty(&json!({
            "from": fmt(period.from),
            "to": fmt(period.to),
            "instances": tally.instances,
            "records": tally.records,
            "first_record": head(&tally.first),
            "last_record": head(&tally.last),
        })),
    );
    // Only what holds for the period: a pack for a period that has ended is made again, byte for byte, from a log
    // that has grown since, as long as its chain is still intact.
    let through = tally.last.as_ref().map(|h| h.seq);
    let chain = match crate::audit::verify(dir) {
        Ok(_) => json!({"intact": true, "period_ends_at_seq": through}),
        Err(broken) => json!({"intact": false, "first_problem": broken.to_string()}),
    };
    files.insert("chain.json".into(), pretty(&chain));
    policy_files(config, period, &tally.generations, &mut files)?;
    // Transactions by the ASID's ODS code in the directory, else the token's.
    let mut counts: BTreeMap<(String, String, String, String), u64> = BTreeMap::new();
    for ((asid, token_ods, interaction, outcome), n) in std::mem::take(&mut tally.transactions) {
        let ods = asid_ods(policy.as_ref(), &asid).unwrap_or(token_ods);
        *counts.entry((asid, ods, interaction, outcome)).or_default() += n;
    }
    let mut csv = String::from("consumer_asid,ods_code,interaction,outcome,transactions\n");
    for ((asid, ods, interaction, outcome), n) in &counts {
        csv.push_str(&csv_line(&[
            asid,
            ods,
            interaction,
            outcome,
            &n.to_string(),
        ]));
    }
    files.insert("transactions.csv".into(), csv.into_bytes());
    let mut csv = String::from("reason,requests\n");
    for (reason, n) in &tally.refusals {
        csv.push_str(&csv_line(&[reason, &n.to_string()]));
    }
    files.insert("refusals.csv".into(), csv.into_bytes());
    files.insert(
        "certificates.json".into(),
        pretty(&certificates(config, period, &tally)),
    );
    let mut csv = String::from("ts,seq,instance,uid,user,sudo_user,hmac,key,written_by\n");
    for r in &tally.lookups {
        let cells: Vec<String> = [
            "ts",
            "seq",
            "instance",
            "uid",
            "user",
            "sudo_user",
            "hmac",
            "key",
            "written_by",
        ]
        .iter()
        .map(|k| match &r[*k] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        })
        .collect();
        let cells: Vec<&str> = cells.iter().map(String::as_str).collect();
        csv.push_str(&csv_line(&cells));
    }
    files.insert("subject-lookups.csv".into(), csv.into_bytes());
    files.insert("README.md".into(), README.as_bytes().to_vec());
    Ok(files)
}

/// A record that bounds the period: its `seq`, `ts` and line (hashed when the pack is written).
struct Head {
    seq: u64,
    ts: String,
    line: String,
}

/// A transaction's key in `Tally::counts` until its outcome is known: sending ASID, the token's ODS code,
/// interaction.
type Opened = (String, String, String);

/// What one pass over the period's records gathers: counts and the few values the pack shows, never the records
/// themselves (a period can hold millions).
#[derive(Default)]
struct Tally {
    records: u64,
    instances: BTreeSet<String>,
    first: Option<Head>,
    last: Option<Head>,
    /// Requests whose response record is yet to come, by (instance, conn_id, trace_id), oldest first (a consumer
    /// may reuse a trace id on one connection): only the transactions in flight at any point.
    open: HashMap<String, VecDeque<Opened>>,
    /// Transactions by (ASID, the token's ODS code, interaction, outcome).
    transactions: BTreeMap<(String, String, String, String), u64>,
    refusals: BTreeMap<String, u64>,
    generations: BTreeSet<u64>,
    /// Consumer certificates by fingerprint: (subject, serial, ASIDs, first seen, last seen).
    certificates: BTreeMap<String, (String, String, BTreeSet<String>, String, String)>,
    lookups: Vec<Value>,
}

impl Tally {
    fn add(&mut self, record: &Value, line: &str) {
        self.records += 1;
        let head = || Head {
            seq: record["seq"].as_u64().unwrap_or_default(),
            ts: record["ts"].as_str().unwrap_or_default().to_owned(),
            line: line.to_owned(),
        };
        if self.first.is_none() {
            self.first = Some(head());
        }
        self.last = Some(head());
        if let Some(instance) = record["instance"].as_str() {
            self.instances.insert(instance.to_owned());
        }
        let key = format!(
            "{}\u{0}{}\u{0}{}",
            record["instance"], record["conn_id"], record["trace_id"]
        );
        if let Some(g) = record["policy_generation"].as_u64() {
            self.generations.insert(g);
        }
        let ts = record["ts"].as_str().unwrap_or("").to_owned();
        match record["kind"].as_str() {
            Some("request") => {
                if record["decision"] == "deny" {
                    let reason = record["reason"].as_str().unwrap_or("");
                    // The reason's error code, not the detail after it (a text, or a URL the consumer sent:
                    // `..._VARIES_FROM_TARGETURL_https://...`).
                    let code = reason.split([':', ' ']).next().unwrap_or(reason);
                    let code = code.find("_http").map_or(code, |at| &code[..at]);
                    *self.refusals.entry(code.to_owned()).or_default() += 1;
                }
                let peer = &record["peer"];
                if let Some(fp) = peer["fingerprint_sha256"].as_str() {
                    let seen = self.certificates.entry(fp.to_owned()).or_insert_with(|| {
                        (
                            peer["subject"].as_str().unwrap_or("").to_owned(),
                            peer["serial"].as_str().unwrap_or("").to_owned(),
                            BTreeSet::new(),
                            ts.clone(),
                            ts.clone(),
                        )
                    });
                    if let Some(from) = record["from"].as_str() {
                        seen.2.insert(from.to_owned());
                    }
                    seen.4.clone_from(&ts);
                }
                let text = |k: &str| record[k].as_str().unwrap_or("").to_owned();
                let token_ods = record["jwt"]["organization_ods"].as_str().unwrap_or("");
                self.open.entry(key).or_default().push_back((
                    text("from"),
                    token_ods.to_owned(),
                    text("interaction"),
                ));
            }
            Some("response") => {
                // A response whose request came before the period belongs to a transaction the period does not
                // count.
                if let Some(queue) = self.open.get_mut(&key)
                    && let Some((asid, ods, interaction)) = queue.pop_front()
                {
                    let outcome = record["outcome"].as_str().unwrap_or("").to_owned();
                    *self
                        .transactions
                        .entry((asid, ods, interaction, outcome))
                        .or_default() += 1;
                    if queue.is_empty() {
                        self.open.remove(&key);
                    }
                }
            }
            Some("subject_lookup") => self.lookups.push(record.clone()),
            _ => {}
        }
    }

    /// Counts the transactions still open at the period's end.
    fn close_open_transactions(&mut self) {
        for (asid, ods, interaction) in self.open.drain().flat_map(|(_, queue)| queue) {
            let outcome = "no response record in the period".to_owned();
            *self
                .transactions
                .entry((asid, ods, interaction, outcome))
                .or_default() += 1;
        }
    }
}

/// The policy generations in force in the period, and those the period's records name.
fn policy_files(
    config: &Config,
    period: Period,
    named: &BTreeSet<u64>,
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let store = Store::open(&config.policy.store)?;
    let history = store.history()?;
    let mut kept = Vec::new();
    for (i, entry) in history.iter().enumerate() {
        let imported = OffsetDateTime::parse(&entry.imported_at, &Rfc3339).ok();
        let replaced = history
            .get(i + 1)
            .and_then(|next| OffsetDateTime::parse(&next.imported_at, &Rfc3339).ok());
        let in_force =
            imported.is_some_and(|t| t <= period.to) && replaced.is_none_or(|t| t >= period.from);
        if !in_force && !named.contains(&entry.number) {
            continue;
        }
        let Some(generation) = store.get(entry.number)? else {
            continue;
        };
        let folder = format!("policy/generation-{}", generation.number);
        let mut listed = Vec::new();
        let sources = generation
            .source
            .files
            .iter()
            .map(|(name, text)| (name.clone(), text))
            .chain(
                generation
                    .source
                    .keys
                    .iter()
                    .map(|(n, t)| (format!("keys/{n}"), t)),
            );
        for (name, text) in sources {
            let safe = safe_path(&name);
            listed.push(json!({"file": name, "in_pack": format!("{folder}/{safe}"),
                               "sha256": crate::hex::HexDigest::of(text.as_bytes()).to_string()}));
            files.insert(format!("{folder}/{safe}"), text.as_bytes().to_vec());
        }
        kept.push(
            json!({"generation": generation.number, "imported_at": generation.imported_at,
                         "sha256": generation.sha256, "in_force_in_period": in_force,
                         "named_by_records": named.contains(&generation.number), "files": listed}),
        );
    }
    let missing: Vec<u64> = named
        .iter()
        .filter(|n| !history.iter().any(|h| h.number == **n))
        .copied()
        .collect();
    files.insert(
        "policy/generations.json".into(),
        pretty(
            &json!({"generations": kept, "named_by_records_but_no_longer_kept": missing,
                       "keep_generations": config.policy.keep_generations}),
        ),
    );
    Ok(())
}

/// The consumer certificates seen, and the proxy's own certificates and CRLs against the period.
fn certificates(config: &Config, period: Period, tally: &Tally) -> Value {
    let from = period.from.unix_timestamp();
    let to = period.to.unix_timestamp();
    let consumers: Vec<Value> = tally
        .certificates
        .iter()
        .map(|(fp, (subject, serial, asids, first, last))| {
            json!({"fingerprint_sha256": fp, "subject": subject, "serial": serial, "asids": asids,
                   "first_seen": first, "last_seen": last})
        })
        .collect();
    let own: Vec<Value> = crate::app::certificate_files(config)
        .iter()
        .map(|c| {
            json!({"key": c.key, "file": c.path.display().to_string(), "not_before": c.not_before,
                   "not_after": c.not_after,
                   "valid_through_period": c.not_before <= from && c.not_after >= to})
        })
        .collect();
    let crls: Vec<Value> = crate::tls::crl_files(&config.server)
        .iter()
        .map(|c| {
            json!({"file": c.path.display().to_string(), "next_update": c.next_update,
                   "next_update_after_period": c.next_update.map(|t| t >= to)})
        })
        .collect();
    json!({
        "consumer_certificates_seen": consumers,
        "proxy_certificates": own,
        "crls_now": crls,
        "note": "CRLs are as they are on disk when the pack is made: the proxy keeps no history of earlier CRLs; \
                 a nextUpdate before the period's end means the list was stale for part of it unless replaced \
                 in time (ssp_crl_next_update_timestamp_seconds in Prometheus has the history)",
    })
}

/// The directory's ODS code for a consumer ASID.
fn asid_ods(policy: Option<&Policy>, asid: &str) -> Option<String> {
    let asid = crate::ids::Asid::parse(asid)?;
    policy?.system(&asid).map(|s| s.ods.as_str().to_owned())
}

/// A policy file name as a path in the pack: `/`-separated parts of `[A-Za-z0-9._-]`, no `..`.
fn safe_path(name: &str) -> String {
    name.split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
        .map(|p| {
            p.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).unwrap_or_default();
    out.push(b'\n');
    out
}

const README: &str = "\
# ssp evidence pack

Made by `ssp evidence` from one proxy instance's transaction log, policy store and configuration, for the period
in `period.json`. Check it with `ssp evidence verify <this folder> [--public-key KEY]`: every file's SHA-256 is in
`MANIFEST`, and `MANIFEST.sig` is the Ed25519 signature (RFC 8032) of `MANIFEST` by the key it names; compare that
key's SHA-256 (printed by `verify`) with the one the operator publishes. The same log, store and key give this pack
byte for byte.

## What it shows

- `chain.json`: whether the hash chain of the whole log was intact when the pack was made (`ssp audit verify`).
- `period.json`: the first and last record of the period with the SHA-256 of their lines: the chain heads that
  bound the period, to compare with a copy held elsewhere.
- `transactions.csv`, `refusals.csv`: what consumers did in the period, by ASID, ODS code, interaction, outcome.
- `policy/`: the directory and data-sharing agreements in force (each generation's files as imported, with hashes).
- `certificates.json`: the consumer certificates used, the proxy's own, and its revocation lists.
- `subject-lookups.csv`: every look-up of a patient's access trail (`ssp audit subject`), by whom.

## What it cannot show

- A local hash chain proves that nothing inside it was changed, not that it was not cut back: records removed from
  the end of the log, with the chain recomputed by whoever controls the disk, leave an intact chain. Only a copy of
  the chain heads held elsewhere (shipped records, a witness) shows that.
- Transactions that never reached this instance (another instance behind the same balancer has its own log and
  pack), and what the provider did with a request after it answered.
- CRL history: revocation lists are shown as they are now, not as they were during the period.
";
