//! SDS `Device` and `Endpoint` resources, read strictly: each problem names the resource and the field.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::ids::{Asid, InteractionId, OdsCode};

use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct Identifier {
    pub(super) system: Option<String>,
    pub(super) value: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Reference {
    pub(super) identifier: Option<Identifier>,
}

#[derive(Debug, Deserialize)]
pub(super) struct DeviceName {
    pub(super) name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeviceResource {
    pub(super) id: Option<String>,
    #[serde(default)]
    pub(super) identifier: Vec<Identifier>,
    pub(super) owner: Option<Reference>,
    #[serde(default)]
    pub(super) device_name: Vec<DeviceName>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ValueReference {
    pub(super) identifier: Option<Identifier>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Extension {
    pub(super) url: Option<String>,
    pub(super) value_reference: Option<ValueReference>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EndpointResource {
    pub(super) id: Option<String>,
    pub(super) address: Option<String>,
    #[serde(default)]
    pub(super) identifier: Vec<Identifier>,
    pub(super) managing_organization: Option<Reference>,
    #[serde(default)]
    pub(super) extension: Vec<Extension>,
}

/// An accredited system, merged over every Device entry that names its ASID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Device {
    pub(super) ids: BTreeSet<String>,
    /// The pages (files or URLs) it was read from.
    pub(super) origins: BTreeSet<String>,
    pub(super) asid: String,
    pub(super) party_key: String,
    pub(super) ods: String,
    pub(super) name: Option<String>,
    pub(super) interactions: BTreeSet<String>,
}

/// A message-handling system, merged over every Endpoint entry that names its party key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mhs {
    pub(super) ids: BTreeSet<String>,
    pub(super) origins: BTreeSet<String>,
    pub(super) party_key: String,
    pub(super) address: String,
    pub(super) fqdn: Option<String>,
    pub(super) cpa_id: Option<String>,
    pub(super) ods: Option<String>,
    pub(super) interactions: BTreeSet<String>,
}
/// A FHIR resource id (R4 `id` datatype: `[A-Za-z0-9\-\.]{1,64}`): it goes into comments of the policy file, so
/// anything else is refused.
pub(super) fn resource_id(id: Option<&str>, kind: &str, origin: &str) -> Result<String, String> {
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
pub(super) fn comment_text(text: &str) -> String {
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

pub(super) fn bounded(s: &str) -> Option<String> {
    (!s.is_empty() && s.len() <= MAX_FIELD).then(|| s.to_owned())
}

/// The values of one identifier system, in order.
pub(super) fn values<'a>(
    identifiers: &'a [Identifier],
    system: &'a str,
) -> impl Iterator<Item = &'a str> {
    identifiers
        .iter()
        .filter(move |i| i.system.as_deref() == Some(system))
        .filter_map(|i| i.value.as_deref())
}

/// Exactly one value of `system`, or a problem naming `what` and the field.
pub(super) fn one(
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

pub(super) fn ods_of(reference: Option<&Reference>) -> Option<&str> {
    reference
        .and_then(|r| r.identifier.as_ref())
        .filter(|i| i.system.as_deref() == Some(ODS_SYSTEM))
        .and_then(|i| i.value.as_deref())
}

pub(super) fn interaction(value: &str, what: &str) -> Result<String, String> {
    InteractionId::parse(value)
        .map(|i| i.as_str().to_owned())
        .ok_or_else(|| format!("{what}: interaction {value:?} is not a well-formed URN"))
}

pub(super) fn read_device(value: &serde_json::Value, origin: &str) -> Result<Device, String> {
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

pub(super) fn read_endpoint(value: &serde_json::Value, origin: &str) -> Result<Mhs, String> {
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
