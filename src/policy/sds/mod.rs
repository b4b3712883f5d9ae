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
//!
//! - `resource`: reading `Device` and `Endpoint` resources strictly.
//! - `build`: joining them by party key and rendering the policy file.
//! - `diff`: what changes against the policy in force.
//! - `fetch`: the live search of the SDS FHIR API (the one part of `policy` that opens sockets).
//! - `refresh`: `ssp policy sds` from start to end: answers, build, compile, diff, write.

mod build;
mod diff;
pub(crate) mod fetch;
pub(crate) mod refresh;
mod resource;

pub use build::build;
pub use diff::diff;

use serde::Deserialize;

/// `identifier.system` of an ASID.
pub(crate) const ASID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsSpineASID";
/// `identifier.system` of a party key.
pub(crate) const PARTY_KEY_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsPartyKey";
/// `identifier.system` of an interaction id (queries, and the Endpoint's interaction extension).
pub(crate) const INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsServiceInteractionId";
/// `identifier.system` under which a Device lists the interactions it is accredited for, one entry each.
pub(crate) const DEVICE_INTERACTION_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsEndpointServiceId";
/// `identifier.system` of an ODS organisation code.
pub(crate) const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// `identifier.system` of an MHS FQDN.
pub(crate) const FQDN_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsFQDN";
/// `identifier.system` of a CPA id.
pub(crate) const CPA_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMhsCPAId";
/// `identifier.system` of an MHS id.
pub(crate) const MHS_ID_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhsMHSId";
/// The Endpoint extension that names the interaction it routes.
pub(crate) const INTERACTION_EXTENSION: &str =
    "https://fhir.nhs.uk/StructureDefinition/Extension-SDS-NhsServiceInteractionId";

/// Most entries read from all Bundles together.
pub(crate) const MAX_ENTRIES: usize = 50_000;
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
    pub(crate) fn parse(origin: &str, bytes: &[u8]) -> Result<Self, String> {
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
    pub(crate) fn next(&self) -> Option<&str> {
        self.link
            .iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url.as_str())
    }
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

/// An Endpoint address as a policy `url`: https only; one or more trailing slashes are removed (SDS often
/// registers the FHIR root with one; check 9 compares without it); no query or fragment.
pub(crate) fn normalise_address(address: &str) -> Result<String, &'static str> {
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

#[cfg(test)]
mod tests;
