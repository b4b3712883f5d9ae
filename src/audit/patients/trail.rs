//! `ssp audit subject`'s rows: every transaction the index names for one patient, from its `request` and
//! `response` records, with the consumer's organisation and system named from the directory.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::Serialize;

use super::index::Entry;
use crate::audit::segment::list_segments;
use crate::ids::Asid;
use crate::policy::Policy;

/// One access to the patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The request record's `ts` (RFC 3339, UTC).
    pub time: String,
    /// The consumer organisation's ODS code: the directory's for the sending ASID, else the token's.
    pub ods_code: Option<String>,
    /// The consumer organisation's name, from the token (`requesting_organization`).
    pub organisation: Option<String>,
    /// The sending system's ASID (`Ssp-From`) and its name in the directory.
    pub asid: Option<String>,
    pub system: Option<String>,
    /// The user, from the token: SDS user id and role profile id.
    pub sds_user_id: Option<String>,
    pub sds_role_profile_id: Option<String>,
    /// The user's name from the token (`requesting_practitioner`: given and family name).
    pub user_name: Option<String>,
    pub interaction: Option<String>,
    /// The interaction in words.
    pub interaction_words: String,
    /// `permit` or `deny`, and the refusal's text.
    pub decision: Option<String>,
    pub reason: Option<String>,
    /// The status the consumer got and the outcome, from the response record (none while the exchange runs).
    pub status: Option<u64>,
    pub outcome: Option<String>,
    pub trace_id: Option<String>,
    pub instance: String,
    /// Where the number was (`query`, `path`, `body`) and whether its check digit held.
    pub found_in: String,
    pub check: String,
}

/// One patient's trail.
#[derive(Debug, Default)]
pub struct Trail {
    pub rows: Vec<Row>,
    /// Transactions the index named whose records in the log do not name this patient's HMAC: the index was
    /// changed (or is not this log's). Left out of `rows`.
    pub unbacked: usize,
}

/// The rows of `entries` (the index's entries for `hmac`), oldest first, each transaction once, and only where
/// one of the transaction's records in the log names `hmac` (the index is a guide, the chain is the evidence);
/// those before `since` left out. Reads the segments the entries name, and the one before and after each (a
/// request and its response may straddle a rotation).
pub fn rows(
    dir: &Path,
    hmac: &str,
    entries: &[Entry],
    policy: Option<&Policy>,
    since: Option<time::OffsetDateTime>,
) -> std::io::Result<Trail> {
    type Key = (String, u64, Option<String>);
    let key_of = |e: &Entry| (e.instance.clone(), e.conn_id, e.trace_id.clone());
    let mut wanted: HashMap<Key, &Entry> = HashMap::new();
    let mut segments = BTreeSet::new();
    for entry in entries {
        wanted.entry(key_of(entry)).or_insert(entry);
        segments.extend([
            entry.segment.saturating_sub(1),
            entry.segment,
            entry.segment + 1,
        ]);
    }
    let names_patient = |v: &serde_json::Value| {
        v["patients"]["ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id["hmac"] == hmac))
    };
    // Every record of a wanted transaction, in log order: one connection may carry several requests under one
    // trace id (an app can reuse its `X-Request-ID`), each its own row. A response is paired with the first
    // request before it of the same interaction not yet paired: HTTP/2 streams end in any order, and a response
    // record names its interaction, not its stream, so pairing by position alone could lend one request's
    // outcome (and the patient its body named) to another.
    let mut requests: HashMap<Key, Vec<serde_json::Value>> = HashMap::new();
    let mut responses: HashMap<Key, Vec<serde_json::Value>> = HashMap::new();
    for (number, path) in list_segments(dir)? {
        if !segments.contains(&number) {
            continue;
        }
        for line in BufReader::new(File::open(&path)?).lines() {
            let line = line?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let key = (
                v["instance"].as_str().unwrap_or_default().to_owned(),
                v["conn_id"].as_u64().unwrap_or_default(),
                v["trace_id"].as_str().map(str::to_owned),
            );
            if !wanted.contains_key(&key) {
                continue;
            }
            match v["kind"].as_str() {
                Some("request") => requests.entry(key).or_default().push(v),
                Some("response") => responses.entry(key).or_default().push(v),
                _ => {}
            }
        }
    }
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_owned);
    let mut out = Vec::new();
    let mut unbacked = 0;
    for (key, entry) in wanted {
        let requests = requests.remove(&key).unwrap_or_default();
        let responses = responses.remove(&key).unwrap_or_default();
        let mut backed = false;
        for (request, response) in pair(&requests, &responses) {
            // The chain is the evidence: a row only where one of its own records names the patient.
            if !(request.is_some_and(&names_patient) || response.is_some_and(&names_patient)) {
                continue;
            }
            backed = true;
            let Some(first) = request.or(response) else {
                continue;
            };
            let time = text(first, "ts").unwrap_or_default();
            if let Some(since) = since {
                let at = time::OffsetDateTime::parse(
                    &time,
                    &time::format_description::well_known::Rfc3339,
                );
                if at.is_ok_and(|at| at < since) {
                    continue;
                }
            }
            let jwt = request.map(|r| &r["jwt"]);
            let claim = |k: &str| jwt.and_then(|j| text(j, k));
            let asid = text(first, "from");
            let system = asid
                .as_deref()
                .and_then(Asid::parse)
                .and_then(|a| policy.and_then(|p| p.system(&a).cloned()));
            let interaction = text(first, "interaction");
            out.push(Row {
                time,
                ods_code: system
                    .as_ref()
                    .map(|s| s.ods.as_str().to_owned())
                    .or_else(|| claim("organization_ods")),
                organisation: claim("organization_name"),
                system: system.as_ref().map(|s| s.name.clone()),
                asid,
                sds_user_id: claim("sds_user_id"),
                sds_role_profile_id: claim("sds_role_profile_id"),
                user_name: match (
                    claim("practitioner_given_name"),
                    claim("practitioner_family_name"),
                ) {
                    (Some(given), Some(family)) => Some(format!("{given} {family}")),
                    (None, None) => request.and_then(|r| patient_facing_user(r, hmac)),
                    (one, other) => one.or(other),
                },
                interaction_words: interaction.as_deref().map_or_else(String::new, words),
                interaction,
                decision: request.and_then(|r| text(r, "decision")),
                reason: request.and_then(|r| text(r, "reason")),
                status: response.and_then(|r| r["status"].as_u64()),
                outcome: response.and_then(|r| text(r, "outcome")),
                trace_id: text(first, "trace_id"),
                instance: entry.instance.clone(),
                found_in: entry.source.clone(),
                check: entry.check.clone(),
            });
        }
        if !backed {
            unbacked += 1;
        }
    }
    out.sort_by(|a, b| (&a.time, &a.trace_id).cmp(&(&b.time, &b.trace_id)));
    Ok(Trail {
        rows: out,
        unbacked,
    })
}

/// A transaction key's requests and responses, in log order, paired: each response with the earliest request of
/// its interaction not yet paired; a request without a response, or a response without a request, alone.
fn pair<'v>(
    requests: &'v [serde_json::Value],
    responses: &'v [serde_json::Value],
) -> Vec<(Option<&'v serde_json::Value>, Option<&'v serde_json::Value>)> {
    let mut pairs: Vec<(Option<&serde_json::Value>, Option<&serde_json::Value>)> =
        requests.iter().map(|r| (Some(r), None)).collect();
    for response in responses {
        let free = pairs.iter_mut().find(|(request, paired)| {
            paired.is_none() && request.is_some_and(|r| r["interaction"] == response["interaction"])
        });
        match free {
            Some(slot) => slot.1 = Some(response),
            None => pairs.push((None, Some(response))),
        }
    }
    pairs
}

/// Who made a patient-facing request (the door's `patient_facing` object), as the trail of the patient `hmac` says
/// it: the patient themselves (the request's token names them), the proxy user acting for them, or someone signed
/// in as another patient whose request named this one (in its path, query or body); and through which app.
fn patient_facing_user(request: &serde_json::Value, hmac: &str) -> Option<String> {
    let access = request.get("patient_facing")?;
    let app = access["client_id"].as_str().unwrap_or("an unnamed app");
    let token_is_theirs = request["patients"]["ids"].as_array().is_some_and(|ids| {
        ids.iter()
            .any(|id| id["hmac"] == hmac && id["in"] == "token")
    });
    Some(match (token_is_theirs, access["acting"].as_str()) {
        (true, Some(acting)) => format!("proxy user {acting} for the patient, in app {app}"),
        (true, None) => format!("the patient, in app {app}"),
        (false, _) => format!("someone signed in as another patient, in app {app}"),
    })
}

/// A GP Connect interaction (DSTU2 or STU3 URN) in words, for a patient or a governance lead; an unknown one by
/// its URN's last part.
pub fn words(interaction: &str) -> String {
    let tail = interaction
        .strip_prefix("urn:nhs:names:services:gpconnect:")
        .unwrap_or(interaction);
    let base = tail.strip_suffix("-1").unwrap_or(tail);
    let known = match base {
        "fhir:rest:read:metadata" | "structured:fhir:rest:read:metadata" => {
            "Read the capability statement"
        }
        "documents:fhir:rest:read:metadata" => "Read the documents capability statement",
        "fhir:rest:read:patient" => "Read the patient's demographics",
        "fhir:rest:search:patient" | "documents:fhir:rest:search:patient" => "Find the patient",
        "fhir:operation:gpc.registerpatient" => "Register the patient",
        "fhir:operation:gpc.getstructuredrecord" => "Retrieve the patient's structured record",
        "fhir:operation:gpc.migratestructuredrecord" => "Migrate the patient's structured record",
        "fhir:operation:gpc.getcarerecord" => "Retrieve the patient's care record (HTML)",
        "fhir:rest:search:patient_appointments" => "Search the patient's appointments",
        "fhir:rest:read:appointment" => "Read an appointment",
        "fhir:rest:create:appointment" => "Book an appointment",
        "fhir:rest:update:appointment" => "Amend an appointment",
        "fhir:rest:cancel:appointment" => "Cancel an appointment",
        "fhir:rest:search:slot" => "Search free slots",
        "documents:fhir:rest:search:documentreference" => "Find the patient's documents",
        "documents:fhir:rest:read:binary" => "Retrieve a document",
        "documents:fhir:rest:migrate:binary" => "Migrate a document",
        _ => return tail.to_owned(),
    };
    known.to_owned()
}

#[cfg(test)]
mod tests {
    use super::pair;

    /// HTTP/2 streams end in any order: a response goes to the request of its interaction, not to the first.
    #[test]
    fn responses_pair_with_their_own_interaction() {
        let record = |kind: &str, interaction: &str| serde_json::json!({ "kind": kind, "interaction": interaction });
        let requests = [
            record("request", "metadata"),
            record("request", "structured"),
        ];
        let responses = [
            record("response", "structured"),
            record("response", "metadata"),
            record("response", "other"),
        ];
        let pairs = pair(&requests, &responses);
        let names: Vec<(Option<&str>, Option<&str>)> = pairs
            .iter()
            .map(|(q, r)| {
                (
                    q.map(|q| q["interaction"].as_str().unwrap_or_default()),
                    r.map(|r| r["interaction"].as_str().unwrap_or_default()),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (Some("metadata"), Some("metadata")),
                (Some("structured"), Some("structured")),
                (None, Some("other")),
            ]
        );
    }
}
