//! The directory from the Spine Directory Service: `[[system]]` and `[[endpoint]]` entries built from SDS FHIR API
//! answers (R4 searchset Bundles of `Device` and `Endpoint` resources), as an ordinary policy file.
//!
//! The join (SDS FHIR API, "Spine Directory Service - FHIR API"): an accredited system is a `Device` (ASID,
//! party key, owning ODS code, the interactions it is accredited for); a message-handling system is an `Endpoint`
//! (address, FQDN, party key, CPA id, managing ODS code, the interaction it routes). The two share a party key. A
//! consumer system becomes a `[[system]]` whose `fqdn` is its Endpoint's `nhsMhsFQDN`; a provider becomes an
//! `[[endpoint]]` whose `url` is its Endpoint's `address`. Which ODS codes are consumers and which are providers is
//! the operator's choice ([`Roles`]); agreements stay hand-written.
//!
//! SDS answers are untrusted input: parsed strictly (a non-`searchset` Bundle, a resource of another type, a
//! missing or repeated identifier, an address that is not https, a malformed ASID, ODS code or interaction URN each
//! name the resource and the field), bounded in size, and the output is compiled by the normal policy compiler
//! before anyone sees it. The rendering is sorted and stable: the same answers give the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Deserialize;

use crate::ids::{Asid, InteractionId, OdsCode};

/// `identifier.system` of an ASID.
pub const ASID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsSpineASID";
/// `identifier.system` of a party key.
pub const PARTY_KEY_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsPartyKey";
/// `identifier.system` of an interaction id (queries, and the Endpoint's interaction extension).
pub const INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsServiceInteractionId";
/// `identifier.system` under which a Device lists the interactions it is accredited for, one entry each.
pub const DEVICE_INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsEndpointServiceId";
/// `identifier.system` of an ODS organisation code.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// `identifier.system` of an MHS FQDN.
pub const FQDN_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsFQDN";
/// `identifier.system` of a CPA id.
pub const CPA_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsCPAId";
/// `identifier.system` of an MHS id.
pub const MHS_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMHSId";
/// The Endpoint extension that names the interaction it routes.
pub const INTERACTION_EXTENSION: &str =
    "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-NhsServiceInteractionId";

/// Most entries read from all Bundles together.
pub const MAX_ENTRIES: usize = 50_000;
/// Longest text field kept from an answer (names, addresses, identifiers).
const MAX_FIELD: usize = 2048;

pub use crate::config::SdsRoles as Roles;

/// One searchset Bundle and where it came from (a file name, or a URL without the API key).
#[derive(Debug, Clone)]
pub struct Page {
    pub origin: String,
    pub bundle: Bundle,
}

/// The part of an R4 Bundle ssp reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    pub resource_type: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub link: Vec<Link>,
    #[serde(default)]
    pub entry: Vec<Entry>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub relation: String,
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub resource: Option<serde_json::Value>,
}

impl Bundle {
    /// Parses one answer: a JSON `Bundle` of type `searchset`, or an error naming `origin`.
    pub fn parse(origin: &str, bytes: &[u8]) -> Result<Self, String> {
        let bundle: Bundle = serde_json::from_slice(bytes)
            .map_err(|e| format!("{origin}: not a FHIR JSON Bundle: {e}"))?;
        if bundle.resource_type != "Bundle" {
            return Err(format!(
                "{origin}: resourceType is {:?}, not \"Bundle\"",
                bundle.resource_type
            ));
        }
        if bundle.kind.as_deref() != Some("searchset") {
            return Err(format!(
                "{origin}: Bundle type is {:?}, not \"searchset\"",
                bundle.kind.as_deref().unwrap_or("(none)")
            ));
        }
        Ok(bundle)
    }

    /// The `next` link, if the search has more pages.
    pub fn next(&self) -> Option<&str> {
        self.link
            .iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url.as_str())
    }
}

#[derive(Debug, Deserialize)]
struct Identifier {
    system: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Reference {
    identifier: Option<Identifier>,
}

#[derive(Debug, Deserialize)]
struct DeviceName {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceResource {
    id: Option<String>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    owner: Option<Reference>,
    #[serde(default)]
    device_name: Vec<DeviceName>,
}

#[derive(Debug, Deserialize)]
struct ValueReference {
    identifier: Option<Identifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Extension {
    url: Option<String>,
    value_reference: Option<ValueReference>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointResource {
    id: Option<String>,
    address: Option<String>,
    #[serde(default)]
    identifier: Vec<Identifier>,
    managing_organization: Option<Reference>,
    #[serde(default)]
    extension: Vec<Extension>,
}

/// An accredited system, merged over every Device entry that names its ASID.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    ids: BTreeSet<String>,
    /// The pages (files or URLs) it was read from.
    origins: BTreeSet<String>,
    asid: String,
    party_key: String,
    ods: String,
    name: Option<String>,
    interactions: BTreeSet<String>,
}

/// A message-handling system, merged over every Endpoint entry that names its party key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mhs {
    ids: BTreeSet<String>,
    origins: BTreeSet<String>,
    party_key: String,
    address: String,
    fqdn: Option<String>,
    cpa_id: Option<String>,
    ods: Option<String>,
    interactions: BTreeSet<String>,
}

/// The directory built from SDS answers: the policy text of the good entries, and a problem per bad one.
#[derive(Debug, Clone)]
pub struct Directory {
    /// The rendered policy file (only the good entries).
    pub text: String,
    /// Each bad entry: the resource and the missing or conflicting field.
    pub problems: Vec<String>,
    /// Counts of `[[system]]` and `[[endpoint]]` entries in `text`.
    pub systems: usize,
    pub endpoints: usize,
}

/// A FHIR resource id (R4 `id` datatype: `[A-Za-z0-9\-\.]{1,64}`): it goes into comments of the policy file, so
/// anything else is refused.
fn resource_id(id: Option<&str>, kind: &str, origin: &str) -> Result<String, String> {
    match id {
        Some(id)
            if !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            Ok(id.to_owned())
        }
        Some(id) => Err(format!(
            "{origin}: {kind} id {:?} is not a FHIR id (letters, digits, - and ., at most 64)",
            id.chars().take(80).collect::<String>()
        )),
        None => Err(format!("{origin}: {kind} without an id")),
    }
}

/// Text for a comment line of the policy file: printable ASCII only, so that nothing from an answer or a file name
/// can end the comment and become policy.
fn comment_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn bounded(s: &str) -> Option<String> {
    (!s.is_empty() && s.len() <= MAX_FIELD).then(|| s.to_owned())
}

/// The values of one identifier system, in order.
fn values<'a>(identifiers: &'a [Identifier], system: &'a str) -> impl Iterator<Item = &'a str> {
    identifiers
        .iter()
        .filter(move |i| i.system.as_deref() == Some(system))
        .filter_map(|i| i.value.as_deref())
}

/// Exactly one value of `system`, or a problem naming `what` and the field.
fn one(
    identifiers: &[Identifier],
    system: &str,
    what: &str,
    field: &str,
) -> Result<String, String> {
    let mut found = values(identifiers, system);
    match (found.next(), found.next()) {
        (Some(v), None) => {
            bounded(v).ok_or_else(|| format!("{what}: {field} is empty or too long"))
        }
        (None, _) => Err(format!("{what}: no {field} (identifier system {system})")),
        (Some(a), Some(b)) => Err(format!("{what}: two {field}s, {a:?} and {b:?}")),
    }
}

fn ods_of(reference: Option<&Reference>) -> Option<&str> {
    reference
        .and_then(|r| r.identifier.as_ref())
        .filter(|i| i.system.as_deref() == Some(ODS_SYSTEM))
        .and_then(|i| i.value.as_deref())
}

fn interaction(value: &str, what: &str) -> Result<String, String> {
    InteractionId::parse(value)
        .map(|i| i.as_str().to_owned())
        .ok_or_else(|| format!("{what}: interaction {value:?} is not a well-formed URN"))
}

fn read_device(value: &serde_json::Value, origin: &str) -> Result<Device, String> {
    let raw = DeviceResource::deserialize(value).map_err(|e| format!("{origin}: Device: {e}"))?;
    let id = resource_id(raw.id.as_deref(), "Device", origin)?;
    let id = id.as_str();
    let what = format!("{origin}: Device {id}");
    let asid = one(&raw.identifier, ASID_SYSTEM, &what, "ASID")?;
    if Asid::parse(&asid).is_none() {
        return Err(format!("{what}: ASID {asid:?} is not 1 to 20 digits"));
    }
    let party_key = one(&raw.identifier, PARTY_KEY_SYSTEM, &what, "party key")?;
    // ODS codes are upper case; SDS is not trusted to write them so.
    let ods = ods_of(raw.owner.as_ref())
        .ok_or_else(|| format!("{what}: no owner ODS code (owner.identifier system {ODS_SYSTEM})"))?
        .to_ascii_uppercase();
    let ods = ods.as_str();
    if OdsCode::parse(ods).is_none() {
        return Err(format!("{what}: owner ODS code {ods:?} is not an ODS code"));
    }
    let mut interactions = BTreeSet::new();
    for v in values(&raw.identifier, DEVICE_INTERACTION_SYSTEM)
        .chain(values(&raw.identifier, INTERACTION_SYSTEM))
    {
        interactions.insert(interaction(v, &what)?);
    }
    Ok(Device {
        ids: BTreeSet::from([id.to_owned()]),
        origins: BTreeSet::from([origin.to_owned()]),
        asid,
        party_key,
        ods: ods.to_owned(),
        name: raw
            .device_name
            .iter()
            .find_map(|n| n.name.as_deref())
            .and_then(bounded),
        interactions,
    })
}

fn read_endpoint(value: &serde_json::Value, origin: &str) -> Result<Mhs, String> {
    let raw =
        EndpointResource::deserialize(value).map_err(|e| format!("{origin}: Endpoint: {e}"))?;
    let id = resource_id(raw.id.as_deref(), "Endpoint", origin)?;
    let id = id.as_str();
    let what = format!("{origin}: Endpoint {id}");
    let party_key = one(&raw.identifier, PARTY_KEY_SYSTEM, &what, "party key")?;
    let address = raw
        .address
        .as_deref()
        .and_then(bounded)
        .ok_or_else(|| format!("{what}: no address"))?;
    let address =
        normalise_address(&address).map_err(|why| format!("{what}: address {address:?} {why}"))?;
    let optional = |system: &str, field: &str| -> Result<Option<String>, String> {
        let mut found = values(&raw.identifier, system);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => Ok(bounded(v)),
            (Some(a), Some(b)) => Err(format!("{what}: two {field}s, {a:?} and {b:?}")),
        }
    };
    let fqdn = optional(FQDN_SYSTEM, "FQDN")?.map(|f| f.to_ascii_lowercase());
    let cpa_id = optional(CPA_ID_SYSTEM, "CPA id")?;
    let _mhs_id = optional(MHS_ID_SYSTEM, "MHS id")?;
    let mut interactions = BTreeSet::new();
    for ext in raw
        .extension
        .iter()
        .filter(|e| e.url.as_deref() == Some(INTERACTION_EXTENSION))
    {
        let identifier = ext
            .value_reference
            .as_ref()
            .and_then(|r| r.identifier.as_ref())
            .filter(|i| i.system.as_deref() == Some(INTERACTION_SYSTEM))
            .and_then(|i| i.value.as_deref())
            .ok_or_else(|| {
                format!("{what}: interaction extension without an {INTERACTION_SYSTEM} identifier")
            })?;
        interactions.insert(interaction(identifier, &what)?);
    }
    Ok(Mhs {
        ids: BTreeSet::from([id.to_owned()]),
        origins: BTreeSet::from([origin.to_owned()]),
        party_key,
        address,
        fqdn,
        cpa_id,
        ods: ods_of(raw.managing_organization.as_ref()).map(str::to_ascii_uppercase),
        interactions,
    })
}

/// An Endpoint address as a policy `url`: https only; one or more trailing slashes are removed (SDS often
/// registers the FHIR root with one; check 9 compares without it); no query or fragment.
pub fn normalise_address(address: &str) -> Result<String, &'static str> {
    let Some(rest) = address.strip_prefix("https://") else {
        return Err("is not https");
    };
    if rest.contains(['?', '#']) || rest.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err("has a query, a fragment or a character a URL cannot hold");
    }
    let trimmed = address.trim_end_matches('/');
    if trimmed.len() <= "https://".len() {
        return Err("has no host");
    }
    // What the policy compiler will require of an endpoint url (check 3's parser), checked here per entry.
    if crate::ssp::Target::parse(trimmed).is_err() {
        return Err(
            "is not a URL the policy accepts (userinfo, port, dot segments, encoded separators, host)",
        );
    }
    Ok(trimmed.to_owned())
}

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
fn quote(s: &str) -> String {
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

/// What adopting `new` (an SDS-built policy) would change in `current` (the policy in force), by ASID: lines
/// starting `+` (added), `-` (removed) and `~` (changed, with each field's old and new value). Only entries SDS is
/// authoritative for can be removed: systems whose ODS code is in `roles.systems`, endpoints in `roles.endpoints`.
pub fn diff(current: &super::Policy, new: &super::Policy, roles: &Roles) -> Vec<String> {
    fn set(items: &std::collections::HashSet<InteractionId>) -> BTreeSet<&str> {
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
    let old_systems: BTreeMap<&str, &super::System> = current
        .systems()
        .into_iter()
        .map(|s| (s.asid.as_str(), s))
        .collect();
    let new_systems: BTreeMap<&str, &super::System> = new
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
    let old_endpoints: BTreeMap<&str, &super::Endpoint> = current
        .endpoints()
        .into_iter()
        .map(|e| (e.asid.as_str(), e))
        .collect();
    let new_endpoints: BTreeMap<&str, &super::Endpoint> = new
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn addresses_are_https_without_trailing_slashes() {
        assert_eq!(
            normalise_address("https://gp.example/B82617/STU3/1/gpconnect/").unwrap(),
            "https://gp.example/B82617/STU3/1/gpconnect"
        );
        assert_eq!(
            normalise_address("https://gp.example:9443/fhir").unwrap(),
            "https://gp.example:9443/fhir"
        );
        for bad in [
            "http://gp.example/fhir",
            "https:///",
            "https://gp.example/a?b=1",
            "https://gp.example/a b",
        ] {
            assert!(normalise_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_keeps_hostile_text_as_data() {
        let q = quote("a\"b\n[[system]]");
        let parsed: toml::Value = toml::from_str(&format!("x = {q}")).unwrap();
        assert_eq!(parsed["x"].as_str(), Some("a\"b\n[[system]]"));
    }
}
