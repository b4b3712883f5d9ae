//! The GP Connect rules for a token's claims, per profile: the [`Validator`] and what it records.

use std::time::Duration;

use super::json::{Json, Obj};
use super::token::{Parts, VerifyingKey, bearer_token};
use super::{Claim, ClaimText, DSTU2_AUDIENCE, JwtAudit, Kept, Profile, Violation};
use crate::ids::InteractionId;

/// Validates tokens for one profile.
#[derive(Debug, Clone)]
pub struct Validator {
    pub profile: Profile,
    pub max_future_skew: Duration,
}

/// What a token is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The endpoint's registered URL (the 1.x audience).
    pub endpoint_url: &'a str,
    pub interaction: &'a InteractionId,
    /// Unix seconds.
    pub now: i64,
    /// The sending system's registered keys: when present, the token must be signed with one of them.
    pub keys: Option<&'a [VerifyingKey]>,
}

impl Validator {
    /// Decodes and validates a request's `Authorization` field lines: none, one, or more than one, which is
    /// `Malformed`. `Authorization` is a singleton field (RFC 9110 section 11.6.2): a second line could carry a
    /// token that the provider reads and ssp did not check.
    pub fn validate_lines<'a>(
        &self,
        mut lines: impl Iterator<Item = &'a [u8]>,
        expect: &Expect<'_>,
    ) -> JwtAudit {
        let first = lines.next();
        if lines.next().is_some() {
            let mut audit = JwtAudit::default();
            audit.violate(Violation::Malformed);
            return audit;
        }
        self.validate(first, expect)
    }

    /// Decodes and validates the value of an `Authorization` header (or its absence).
    pub fn validate(&self, authorization: Option<&[u8]>, expect: &Expect<'_>) -> JwtAudit {
        let mut audit = JwtAudit::default();
        let checked =
            bearer_token(authorization).and_then(|token| self.read(token, expect, &mut audit));
        if let Err(v) = checked {
            audit.violate(v);
        }
        audit.valid = audit.found.is_empty();
        audit
    }

    /// Decodes the token, checks its header and signature, then its claims; the audit keeps the decoded claims
    /// set, which its kept claims point into.
    fn read(
        &self,
        token: &str,
        expect: &Expect<'_>,
        audit: &mut JwtAudit,
    ) -> Result<(), Violation> {
        let parts = Parts::split(token)?;
        {
            let (header, claims) = (parts.header()?, parts.payload()?);
            audit.alg = accepted_alg(parts.verify(&header, expect.keys)?);
            let source = ClaimsBuffer::of(parts.payload_bytes());
            self.validate_claims(claims.root(), &source, expect, audit);
        }
        audit.claims = parts.into_payload();
        Ok(())
    }

    fn validate_claims(
        &self,
        claims: Obj<'_>,
        source: &ClaimsBuffer,
        expect: &Expect<'_>,
        audit: &mut JwtAudit,
    ) {
        let mut c = Claims {
            found: Claims::index(claims),
            audit,
        };
        let iss = c.string(Claim::Iss);
        c.keep(Kept::Iss, iss, source);
        let sub = c.string(Claim::Sub);
        c.keep(Kept::Sub, sub, source);
        let aud = c.string(Claim::Aud);
        c.keep(Kept::Aud, aud, source);
        let exp = c.integer(Claim::Exp);
        let iat = c.integer(Claim::Iat);
        c.audit.exp = exp;
        c.audit.iat = iat;
        let reason = c.string(Claim::ReasonForRequest);
        c.keep(Kept::ReasonForRequest, reason, source);
        let scope = c.string(Claim::RequestedScope);
        c.keep(Kept::RequestedScope, scope, source);
        let device = c.resource(Claim::RequestingDevice, "Device");
        let organization = c.resource(Claim::RequestingOrganization, "Organization");
        let practitioner = c.resource(Claim::RequestingPractitioner, "Practitioner");

        if let (Some(exp), Some(iat)) = (exp, iat) {
            if exp.checked_sub(iat) != Some(300) {
                c.audit.violate(Violation::ExpIat);
            }
            if expect.now > exp {
                c.audit.violate(Violation::Expired);
            }
            let skew = i64::try_from(self.max_future_skew.as_secs()).unwrap_or(i64::MAX);
            if iat > expect.now.saturating_add(skew) {
                c.audit.violate(Violation::IssuedInFuture);
            }
        }
        if let Some(reason) = reason {
            let migrating = || expect.interaction.as_str().contains("migrate");
            if !(reason == "directcare" || (reason == "migration" && migrating())) {
                c.audit.violate(Violation::Invalid(Claim::ReasonForRequest));
            }
        }
        if let Some(scope) = scope {
            match parse_scope(scope) {
                None => c.audit.violate(Violation::Invalid(Claim::RequestedScope)),
                Some(base) => {
                    if required_scope(expect.interaction).is_some_and(|need| need != base) {
                        c.audit.violate(Violation::ScopeForInteraction);
                    }
                }
            }
        }
        if let Some(device) = device {
            let identifier = first_identifier(device);
            let model = device.get("model").and_then(Json::as_str);
            let version = device.get("version").and_then(Json::as_str);
            match (identifier, model, version) {
                (Some((system, value)), Some(model), Some(version))
                    if !model.is_empty() && !version.is_empty() =>
                {
                    c.audit.device_identifier = Some((source.text(system), source.text(value)));
                    c.keep(Kept::DeviceModel, Some(model), source);
                    c.keep(Kept::DeviceVersion, Some(version), source);
                }
                _ => c.audit.violate(Violation::Invalid(Claim::RequestingDevice)),
            }
        }
        if let Some(org) = organization {
            let name = org.get("name").and_then(Json::as_str);
            c.keep(Kept::OrganizationName, name, source);
            match identifier_value(org, self.profile.ods_system()) {
                Some(ods) => c.keep(Kept::OrganizationOds, Some(ods), source),
                None => c.audit.violate(Violation::OdsIdentifier),
            }
        }
        if let Some(practitioner) = practitioner {
            let id = practitioner
                .get("id")
                .and_then(Json::as_str)
                .filter(|id| !id.is_empty());
            c.keep(Kept::PractitionerId, id, source);
            if id.is_none() {
                c.audit
                    .violate(Violation::Invalid(Claim::RequestingPractitioner));
            }
            if sub.is_some() && id.is_some() && sub != id {
                c.audit.violate(Violation::SubNotPractitioner);
            }
            // `UNK` is the documented value for an unknown SDS id and is accepted.
            match identifier_value(practitioner, self.profile.sds_user_system()) {
                Some(sds) => c.keep(Kept::SdsUserId, Some(sds), source),
                None => c.audit.violate(Violation::SdsUserId),
            }
            let role = identifier_value(practitioner, self.profile.sds_role_system());
            c.keep(Kept::SdsRoleProfileId, role, source);
            // The user's name, for a patient's access trail (not checked: the specification requires only its
            // presence in some versions): the first HumanName's `family` (STU3 a string, DSTU2 a list) and first
            // `given`.
            let name = practitioner
                .get("name")
                .and_then(first_of)
                .and_then(Json::as_object);
            let part = |key: &str| {
                name.and_then(|n| n.get(key))
                    .and_then(first_of)
                    .and_then(Json::as_str)
                    .filter(|t| !t.is_empty())
            };
            c.keep(Kept::PractitionerFamilyName, part("family"), source);
            c.keep(Kept::PractitionerGivenName, part("given"), source);
        }
        if let Some(aud) = aud {
            let want = match self.profile {
                Profile::GpConnect1 => expect.endpoint_url,
                Profile::GpConnect07 => DSTU2_AUDIENCE,
            };
            if aud != want {
                c.audit.violate(Violation::Audience);
            }
        }
        let record = c.found[Claim::RequestedRecord as usize];
        match (self.profile, record) {
            (Profile::GpConnect1, Some(_)) => c.audit.violate(Violation::UnexpectedRequestedRecord),
            (Profile::GpConnect07, None) => {
                c.audit.violate(Violation::Missing(Claim::RequestedRecord))
            }
            (Profile::GpConnect07, Some(r)) => {
                let kind = r.get("resourceType").and_then(Json::as_str);
                if !matches!(kind, Some("Patient" | "Organization")) {
                    c.audit.violate(Violation::Invalid(Claim::RequestedRecord));
                }
            }
            (Profile::GpConnect1, None) => {}
        }
    }
}

/// Reads typed claims, recording missing and mistyped ones.
struct Claims<'a, 'b> {
    /// The claims GP Connect names, by [`Claim`], found in one pass over the claims set.
    found: [Option<Json<'a>>; Claim::COUNT],
    audit: &'b mut JwtAudit,
}

impl<'a> Claims<'a, '_> {
    fn index(claims: Obj<'a>) -> [Option<Json<'a>>; Claim::COUNT] {
        let mut found = [None; Claim::COUNT];
        for (key, value) in claims.entries() {
            if let Some(claim) = Claim::named(key) {
                found[claim as usize] = Some(value);
            }
        }
        found
    }

    /// Keeps a claim's text for the audit trail, as a place in the claims set.
    fn keep(&mut self, which: Kept, text: Option<&str>, source: &ClaimsBuffer) {
        self.audit.kept[which as usize] = text.map(|t| source.text(t));
    }

    fn get(&mut self, claim: Claim) -> Option<Json<'a>> {
        let value = self.found[claim as usize];
        if value.is_none() {
            self.audit.violate(Violation::Missing(claim));
        }
        value
    }

    fn string(&mut self, claim: Claim) -> Option<&'a str> {
        let value = self.get(claim)?;
        let text = value.as_str().filter(|s| !s.is_empty());
        if text.is_none() {
            self.audit.violate(Violation::Invalid(claim));
        }
        text
    }

    /// An integer number of seconds (a float or a string is invalid).
    fn integer(&mut self, claim: Claim) -> Option<i64> {
        let value = self.get(claim)?;
        let n = value.as_i64();
        if n.is_none() {
            self.audit.violate(Violation::Invalid(claim));
        }
        n
    }

    /// A JSON object whose `resourceType` is `kind`.
    fn resource(&mut self, claim: Claim, kind: &str) -> Option<Obj<'a>> {
        let value = self.get(claim)?;
        let object = value
            .as_object()
            .filter(|o| o.get("resourceType").and_then(Json::as_str) == Some(kind));
        if object.is_none() {
            self.audit.violate(Violation::Invalid(claim));
        }
        object
    }
}

fn identifiers(resource: Obj<'_>) -> impl Iterator<Item = (&str, &str)> {
    resource
        .get("identifier")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)))
}

/// A list's first item, or the value itself when it is not a list (FHIR STU3 and DSTU2 differ on which
/// HumanName parts are lists).
fn first_of(v: Json<'_>) -> Option<Json<'_>> {
    match v.as_array() {
        Some(mut items) => items.next(),
        None => Some(v),
    }
}

fn first_identifier(resource: Obj<'_>) -> Option<(&str, &str)> {
    identifiers(resource)
        .next()
        .filter(|(s, v)| !s.is_empty() && !v.is_empty())
}

fn identifier_value<'a>(resource: Obj<'a>, system: &str) -> Option<&'a str> {
    identifiers(resource)
        .find(|(s, _)| *s == system)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The base scope of a `requested_scope` value: one of the four GP Connect scopes, optionally followed by
/// ` conf/N` or ` conf/R` (1.6). Anything else is invalid.
fn parse_scope(scope: &str) -> Option<&str> {
    let mut parts = scope.split(' ');
    let base = parts.next()?;
    let known = matches!(
        base,
        "patient/*.read" | "patient/*.write" | "organization/*.read" | "organization/*.write"
    );
    let rest_ok = matches!(
        (parts.next(), parts.next()),
        (None, _) | (Some("conf/N" | "conf/R"), None)
    );
    (known && rest_ok).then_some(base)
}

/// The scope an interaction needs, when it is one GP Connect documents (SSP-DOMAIN.md section 6).
pub fn required_scope(interaction: &InteractionId) -> Option<&'static str> {
    let urn = interaction
        .as_str()
        .strip_prefix("urn:nhs:names:services:gpconnect:")?;
    // `structured:` and `documents:` prefixes share the rules of the plain forms.
    let op = urn.strip_prefix("structured:").unwrap_or(urn);
    let op = op.strip_prefix("documents:").unwrap_or(op);
    let op = op.strip_suffix("-1").unwrap_or(op);
    let organization_read = [
        "fhir:rest:read:metadata",
        "fhir:rest:read:practitioner",
        "fhir:rest:search:practitioner",
        "fhir:rest:read:organization",
        "fhir:rest:search:organization",
        "fhir:rest:read:location",
        "fhir:rest:search:slot",
    ];
    let patient_write = [
        "fhir:operation:gpc.registerpatient",
        "fhir:rest:create:appointment",
        "fhir:rest:update:appointment",
        "fhir:rest:cancel:appointment",
    ];
    let patient_read = [
        "fhir:rest:read:patient",
        "fhir:rest:search:patient",
        "fhir:rest:read:appointment",
        "fhir:rest:search:patient_appointments",
        "fhir:operation:gpc.getstructuredrecord",
        "fhir:operation:gpc.migratestructuredrecord",
        "fhir:operation:gpc.getcarerecord",
        "fhir:rest:search:documentreference",
        "fhir:rest:read:binary",
        "fhir:rest:migrate:binary",
    ];
    if organization_read.contains(&op) {
        Some("organization/*.read")
    } else if patient_write.contains(&op) {
        Some("patient/*.write")
    } else if patient_read.contains(&op) {
        Some("patient/*.read")
    } else {
        None
    }
}

/// The decoded claims set the JSON was read from, to tell a string that borrows it (no escapes) from one that was
/// unescaped into a copy.
struct ClaimsBuffer {
    start: usize,
    len: usize,
}

impl ClaimsBuffer {
    fn of(bytes: &[u8]) -> Self {
        Self {
            start: bytes.as_ptr() as usize,
            len: bytes.len(),
        }
    }

    /// Where `text` is in the claims set, or a copy when it is not there (it had escapes).
    fn text(&self, text: &str) -> ClaimText {
        let at = (text.as_ptr() as usize).wrapping_sub(self.start);
        match (u32::try_from(at), u32::try_from(at + text.len())) {
            (Ok(start), Ok(end)) if at <= self.len && text.len() <= self.len - at => {
                ClaimText::At(start, end)
            }
            _ => ClaimText::Unescaped(text.into()),
        }
    }
}

/// The accepted `alg` values, as static text: `none`, or a signing algorithm [`Parts::verify`] accepts.
fn accepted_alg(alg: &str) -> Option<&'static str> {
    ["none", "RS256", "RS512", "PS256", "ES256"]
        .into_iter()
        .find(|known| *known == alg)
}
