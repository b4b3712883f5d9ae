//! The join by party key, and the policy file rendered from it: sorted, stable, each entry commented with its source.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::resource::*;
use super::*;

/// Joins the Devices and Endpoints of `pages` into a directory for `roles`. Every problem is collected (none stops
/// the others); an entry with a problem is left out of the text. `source_note` heads the file; each entry's comment
/// names its SDS resource ids and, for a live fetch, `fetched` (RFC 3339), else the files it was read from.
pub fn build(pages: &[Page], roles: &Roles, source_note: &str, fetched: Option<&str>) -> Directory {
    let mut problems = Vec::new();
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    let mut bad_asids = BTreeSet::new();
    let mut mhs: BTreeMap<String, Mhs> = BTreeMap::new();
    let mut bad_keys = BTreeSet::new();
    let mut entries = 0usize;
    for page in pages {
        for entry in &page.bundle.entry {
            entries += 1;
            if entries > MAX_ENTRIES {
                problems.push(format!(
                    "more than {MAX_ENTRIES} entries: the rest are not read"
                ));
                break;
            }
            let Some(resource) = &entry.resource else {
                continue;
            };
            match resource.get("resourceType").and_then(|t| t.as_str()) {
                Some("Device") => match read_device(resource, &page.origin) {
                    Err(p) => problems.push(p),
                    Ok(d) => merge_device(&mut devices, &mut bad_asids, &mut problems, d),
                },
                Some("Endpoint") => match read_endpoint(resource, &page.origin) {
                    Err(p) => problems.push(p),
                    Ok(e) => merge_mhs(&mut mhs, &mut bad_keys, &mut problems, e),
                },
                // An OperationOutcome in a searchset carries warnings; anything else is not ours.
                Some("OperationOutcome") => {}
                other => problems.push(format!(
                    "{}: an entry of type {:?} in a Device or Endpoint search",
                    page.origin,
                    other.unwrap_or("(none)")
                )),
            }
        }
    }
    for asid in &bad_asids {
        devices.remove(asid);
    }
    for key in &bad_keys {
        mhs.remove(key);
    }
    // The join, both ways.
    let device_keys: BTreeSet<&str> = devices.values().map(|d| d.party_key.as_str()).collect();
    for (key, m) in &mhs {
        if !device_keys.contains(key.as_str()) && !bad_keys.contains(key) {
            problems.push(format!(
                "party key {key}: Endpoint {} has no Device",
                join(&m.ids)
            ));
        }
    }
    let keep = |set: &BTreeSet<String>| -> Vec<String> {
        set.iter()
            .filter(|i| roles.interactions.is_empty() || roles.interactions.contains(*i))
            .cloned()
            .collect()
    };
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Directory from the Spine Directory Service, written by `ssp policy sds`: do not edit by hand.\n\
         # {}\n# Agreements stay hand-written, in files of their own.",
        comment_text(source_note)
    );
    let (mut systems, mut endpoints) = (0, 0);
    for device in devices.values() {
        let what = format!("Device {} (ASID {})", join(&device.ids), device.asid);
        let Some(m) = mhs.get(&device.party_key) else {
            problems.push(format!(
                "party key {}: {what} has no Endpoint",
                device.party_key
            ));
            continue;
        };
        if let Some(ods) = &m.ods
            && *ods != device.ods
        {
            problems.push(format!(
                "party key {}: {what} belongs to ODS {} but its Endpoint {} to ODS {ods}",
                device.party_key,
                device.ods,
                join(&m.ids)
            ));
            continue;
        }
        let when = match fetched {
            Some(at) => format!("fetched {at}"),
            None => format!(
                "from {}",
                join(&device.origins.union(&m.origins).cloned().collect())
            ),
        };
        let sources = comment_text(&format!(
            "SDS Device {}; Endpoint {}; {when}",
            join(&device.ids),
            join(&m.ids)
        ));
        let name = device
            .name
            .clone()
            .unwrap_or_else(|| format!("{} {}", device.ods, device.party_key));
        if roles.systems.contains(&device.ods) {
            let interactions = keep(&device.interactions);
            match (&m.fqdn, interactions.is_empty()) {
                (None, _) => problems.push(format!(
                    "{what}: its Endpoint {} has no FQDN (identifier system {FQDN_SYSTEM})",
                    join(&m.ids)
                )),
                (_, true) => problems.push(format!("{what}: none of the interactions asked for")),
                (Some(fqdn), false) if !is_host_name(fqdn) => problems.push(format!(
                    "{what}: its Endpoint {} has FQDN {fqdn:?}, not a host name",
                    join(&m.ids)
                )),
                (Some(fqdn), false) => {
                    let _ = write!(
                        text,
                        "\n# {sources}\n[[system]]\nasid = {}\nname = {}\nods = {}\nfqdn = {}\ninteractions = {}\n",
                        quote(&device.asid),
                        quote(&name),
                        quote(&device.ods),
                        quote(fqdn),
                        list(&interactions)
                    );
                    systems += 1;
                }
            }
        }
        if roles.endpoints.contains(&device.ods) {
            // What the system is accredited for and its MHS routes.
            let both: BTreeSet<String> = device
                .interactions
                .intersection(&m.interactions)
                .cloned()
                .collect();
            let interactions = keep(&both);
            match (&m.cpa_id, interactions.is_empty()) {
                (None, _) => problems.push(format!(
                    "{what}: its Endpoint {} has no CPA id (identifier system {CPA_ID_SYSTEM})",
                    join(&m.ids)
                )),
                (_, true) => problems.push(format!(
                    "{what}: no interaction asked for is both accredited (Device) and routed (Endpoint)"
                )),
                (Some(cpa_id), false) => {
                    let _ = write!(
                        text,
                        "\n# {sources}\n[[endpoint]]\nasid = {}\nparty_key = {}\ncpa_id = {}\nods = {}\nurl = {}\ninteractions = {}\n",
                        quote(&device.asid),
                        quote(&device.party_key),
                        quote(cpa_id),
                        quote(&device.ods),
                        quote(&m.address),
                        list(&interactions)
                    );
                    endpoints += 1;
                }
            }
        }
    }
    Directory {
        text,
        problems,
        systems,
        endpoints,
    }
}

/// A host name as the policy compiler takes an `fqdn`: the authority of `https://<name>`, with no port or IP-literal
/// brackets.
fn is_host_name(name: &str) -> bool {
    crate::ssp::Target::parse(&format!("https://{name}"))
        .is_ok_and(|t| t.authority() == name && !name.contains([':', '[']))
}

fn merge_device(
    devices: &mut BTreeMap<String, Device>,
    bad: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
    d: Device,
) {
    match devices.get_mut(&d.asid) {
        None => {
            devices.insert(d.asid.clone(), d);
        }
        Some(seen) if seen.party_key != d.party_key || seen.ods != d.ods => {
            problems.push(format!(
                "two Devices claim ASID {}: {} (party key {}, ODS {}) and {} (party key {}, ODS {})",
                d.asid,
                join(&seen.ids),
                seen.party_key,
                seen.ods,
                join(&d.ids),
                d.party_key,
                d.ods
            ));
            bad.insert(d.asid);
        }
        Some(seen) => {
            seen.ids.extend(d.ids);
            seen.origins.extend(d.origins);
            seen.interactions.extend(d.interactions);
            if seen.name.is_none() {
                seen.name = d.name;
            }
        }
    }
}

fn merge_mhs(
    all: &mut BTreeMap<String, Mhs>,
    bad: &mut BTreeSet<String>,
    problems: &mut Vec<String>,
    m: Mhs,
) {
    match all.get_mut(&m.party_key) {
        None => {
            all.insert(m.party_key.clone(), m);
        }
        Some(seen) => {
            for (field, a, b) in [
                ("addresses", Some(&seen.address), Some(&m.address)),
                ("FQDNs", seen.fqdn.as_ref(), m.fqdn.as_ref()),
                ("CPA ids", seen.cpa_id.as_ref(), m.cpa_id.as_ref()),
                ("ODS codes", seen.ods.as_ref(), m.ods.as_ref()),
            ] {
                if let (Some(a), Some(b)) = (a, b)
                    && a != b
                {
                    problems.push(format!(
                        "party key {}: Endpoints {} and {} have different {field}, {a:?} and {b:?}",
                        m.party_key,
                        join(&seen.ids),
                        join(&m.ids)
                    ));
                    bad.insert(m.party_key.clone());
                    return;
                }
            }
            seen.ids.extend(m.ids);
            seen.origins.extend(m.origins);
            seen.interactions.extend(m.interactions);
            seen.fqdn = seen.fqdn.take().or(m.fqdn);
            seen.cpa_id = seen.cpa_id.take().or(m.cpa_id);
            seen.ods = seen.ods.take().or(m.ods);
        }
    }
}

fn join(ids: &BTreeSet<String>) -> String {
    ids.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// A TOML basic string, escaped by the `toml` crate (SDS text is untrusted: quotes and newlines stay data).
pub(super) fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let mut out = String::from("[\n");
    for item in items {
        let _ = writeln!(out, "    {},", quote(item));
    }
    out.push(']');
    out
}
