//! What a directory changes against the policy in force: added, removed and changed entries, named by ASID.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::InteractionId;

use super::*;

/// What adopting `new` (an SDS-built policy) would change in `current` (the policy in force), by ASID: lines
/// starting `+` (added), `-` (removed) and `~` (changed, with each field's old and new value). Only entries SDS is
/// authoritative for can be removed: systems whose ODS code is in `roles.systems`, endpoints in `roles.endpoints`.
pub fn diff(
    current: &crate::policy::Policy,
    new: &crate::policy::Policy,
    roles: &Roles,
) -> Vec<String> {
    fn set(items: &crate::ids::IdSet<InteractionId>) -> BTreeSet<&str> {
        items.iter().map(InteractionId::as_str).collect()
    }
    fn change(out: &mut Vec<String>, field: &str, old: &str, new: &str) {
        if old != new {
            out.push(format!("{field} {old:?} -> {new:?}"));
        }
    }
    fn interactions(out: &mut Vec<String>, old: BTreeSet<&str>, new: BTreeSet<&str>) {
        for added in new.difference(&old) {
            out.push(format!("interaction +{added}"));
        }
        for removed in old.difference(&new) {
            out.push(format!("interaction -{removed}"));
        }
    }
    let mut lines = Vec::new();
    let old_systems: BTreeMap<&str, &crate::policy::System> = current
        .systems()
        .into_iter()
        .map(|s| (s.asid.as_str(), s))
        .collect();
    let new_systems: BTreeMap<&str, &crate::policy::System> = new
        .systems()
        .into_iter()
        .map(|s| (s.asid.as_str(), s))
        .collect();
    for (asid, n) in &new_systems {
        match old_systems.get(asid) {
            None => lines.push(format!(
                "+ system {asid} ({}, ODS {}, fqdn {})",
                n.name,
                n.ods.as_str(),
                n.fqdn
            )),
            Some(o) => {
                let mut fields = Vec::new();
                change(&mut fields, "name", &o.name, &n.name);
                change(&mut fields, "ods", o.ods.as_str(), n.ods.as_str());
                change(&mut fields, "fqdn", &o.fqdn, &n.fqdn);
                interactions(&mut fields, set(&o.interactions), set(&n.interactions));
                if !fields.is_empty() {
                    lines.push(format!("~ system {asid}: {}", fields.join("; ")));
                }
            }
        }
    }
    for (asid, o) in &old_systems {
        if !new_systems.contains_key(asid) && roles.systems.contains(o.ods.as_str()) {
            lines.push(format!(
                "- system {asid} ({}, ODS {})",
                o.name,
                o.ods.as_str()
            ));
        }
    }
    let old_endpoints: BTreeMap<&str, &crate::policy::Endpoint> = current
        .endpoints()
        .into_iter()
        .map(|e| (e.asid.as_str(), e))
        .collect();
    let new_endpoints: BTreeMap<&str, &crate::policy::Endpoint> = new
        .endpoints()
        .into_iter()
        .map(|e| (e.asid.as_str(), e))
        .collect();
    for (asid, n) in &new_endpoints {
        match old_endpoints.get(asid) {
            None => lines.push(format!(
                "+ endpoint {asid} ({}, ODS {})",
                n.url,
                n.ods.as_str()
            )),
            Some(o) => {
                let mut fields = Vec::new();
                change(&mut fields, "party_key", &o.party_key, &n.party_key);
                change(&mut fields, "cpa_id", &o.cpa_id, &n.cpa_id);
                change(&mut fields, "ods", o.ods.as_str(), n.ods.as_str());
                change(&mut fields, "url", &o.url, &n.url);
                interactions(&mut fields, set(&o.interactions), set(&n.interactions));
                if !fields.is_empty() {
                    lines.push(format!("~ endpoint {asid}: {}", fields.join("; ")));
                }
            }
        }
    }
    for (asid, o) in &old_endpoints {
        if !new_endpoints.contains_key(asid) && roles.endpoints.contains(o.ods.as_str()) {
            lines.push(format!(
                "- endpoint {asid} ({}, ODS {})",
                o.url,
                o.ods.as_str()
            ));
        }
    }
    lines
}
