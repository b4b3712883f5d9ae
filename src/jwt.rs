//! The consumer's `Authorization: Bearer` audit token (SSP-DOMAIN.md section 6): a strict decoder for unsigned
//! GP Connect tokens (`alg: none`), signature verification for systems that register keys, and validation of the
//! claims for a profile (`gpconnect-1`, STU3, or `gpconnect-0.7`, DSTU2). The result is a [`JwtAudit`]: the claims
//! that matter for the audit trail, `valid`, and every violation by its stable machine name.
//!
//! `now` is passed in; nothing here reads a clock, touches the network or logs. Tokens and claims never leave
//! this module except inside the `JwtAudit` that goes to the audit trail.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::ids::InteractionId;

/// Largest token read (a typical GP Connect token is about 1.5 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The fixed DSTU2 (0.7) audience.
pub const DSTU2_AUDIENCE: &str = "https://authorize.fhir.nhs.net/token";

/// What `jwt.mode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Do not look at tokens.
    Off,
    /// Decode and validate; record violations; forward anyway.
    Audit,
    /// Refuse a request whose token has a violation with 400 `INVALID_JWT_<NAME>`.
    Enforce,
}

/// The GP Connect version whose rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// GP Connect 1.x (FHIR STU3).
    GpConnect1,
    /// GP Connect 0.7 (FHIR DSTU2).
    GpConnect07,
}

impl Profile {
    fn ods_system(self) -> &'static str {
        match self {
            Profile::GpConnect1 => "https://fhir.nhs.uk/Id/ods-organization-code",
            Profile::GpConnect07 => "http://fhir.nhs.net/Id/ods-organization-code",
        }
    }

    fn sds_user_system(self) -> &'static str {
        match self {
            Profile::GpConnect1 => "https://fhir.nhs.uk/Id/sds-user-id",
            Profile::GpConnect07 => "http://fhir.nhs.net/sds-user-id",
        }
    }

    fn sds_role_system(self) -> &'static str {
        match self {
            Profile::GpConnect1 => "https://fhir.nhs.uk/Id/sds-role-profile-id",
            Profile::GpConnect07 => "http://fhir.nhs.net/Id/sds-role-profile-id",
        }
    }
}

/// The token's claims, by name, for violation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Iss,
    Sub,
    Aud,
    Exp,
    Iat,
    ReasonForRequest,
    RequestedScope,
    RequestingDevice,
    RequestingOrganization,
    RequestingPractitioner,
    RequestedRecord,
}

impl Claim {
    fn key(self) -> &'static str {
        match self {
            Claim::Iss => "iss",
            Claim::Sub => "sub",
            Claim::Aud => "aud",
            Claim::Exp => "exp",
            Claim::Iat => "iat",
            Claim::ReasonForRequest => "reason_for_request",
            Claim::RequestedScope => "requested_scope",
            Claim::RequestingDevice => "requesting_device",
            Claim::RequestingOrganization => "requesting_organization",
            Claim::RequestingPractitioner => "requesting_practitioner",
            Claim::RequestedRecord => "requested_record",
        }
    }
}

/// One rule a token broke. [`Violation::name`] is stable: it appears in `INVALID_JWT_<NAME>` and in the audit
/// record, and operators may alert on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// Not three base64url parts (padding, `+`, `/`, raw JSON and the like) or not JSON objects.
    Malformed,
    /// A JSON object in the header or claims repeats a key.
    DuplicateKey,
    /// The header is not exactly `{"alg":"none","typ":"JWT"}` (or, for a system with keys, a supported signing
    /// algorithm).
    Header,
    /// An unsigned token with a non-empty signature part.
    UnexpectedSignature,
    /// A system with registered keys sent an unsigned token.
    SignatureRequired,
    /// The signature does not verify with any registered key.
    BadSignature,
    /// A required claim is absent.
    Missing(Claim),
    /// A claim has the wrong JSON type, is empty, or is not the FHIR resource it must be.
    Invalid(Claim),
    /// `exp - iat` is not exactly 300.
    ExpIat,
    /// `exp` has passed.
    Expired,
    /// `iat` is further in the future than `jwt.max_future_skew`.
    IssuedInFuture,
    /// `requested_scope` does not fit the interaction (read vs write, patient vs organization).
    ScopeForInteraction,
    /// `sub` differs from `requesting_practitioner.id`.
    SubNotPractitioner,
    /// `aud` is not the endpoint's registered URL (1.x) or the DSTU2 audience (0.7).
    Audience,
    /// `requesting_organization` has no ODS code identifier of the profile's system.
    OdsIdentifier,
    /// `requesting_practitioner` has no SDS user id identifier of the profile's system.
    SdsUserId,
    /// `requested_record` appears in a 1.x token.
    UnexpectedRequestedRecord,
}

impl Violation {
    pub fn name(self) -> &'static str {
        use Claim::*;
        match self {
            Violation::MissingToken => "MISSING_TOKEN",
            Violation::TooLarge => "TOO_LARGE",
            Violation::Malformed => "MALFORMED",
            Violation::DuplicateKey => "DUPLICATE_KEY",
            Violation::Header => "HEADER",
            Violation::UnexpectedSignature => "UNEXPECTED_SIGNATURE",
            Violation::SignatureRequired => "SIGNATURE_REQUIRED",
            Violation::BadSignature => "BAD_SIGNATURE",
            Violation::Missing(c) => match c {
                Iss => "MISSING_ISS",
                Sub => "MISSING_SUB",
                Aud => "MISSING_AUD",
                Exp => "MISSING_EXP",
                Iat => "MISSING_IAT",
                ReasonForRequest => "MISSING_REASON_FOR_REQUEST",
                RequestedScope => "MISSING_REQUESTED_SCOPE",
                RequestingDevice => "MISSING_REQUESTING_DEVICE",
                RequestingOrganization => "MISSING_REQUESTING_ORGANIZATION",
                RequestingPractitioner => "MISSING_REQUESTING_PRACTITIONER",
                RequestedRecord => "MISSING_REQUESTED_RECORD",
            },
            Violation::Invalid(c) => match c {
                Iss => "INVALID_ISS",
                Sub => "INVALID_SUB",
                Aud => "INVALID_AUD",
                Exp => "INVALID_EXP",
                Iat => "INVALID_IAT",
                ReasonForRequest => "INVALID_REASON_FOR_REQUEST",
                RequestedScope => "INVALID_REQUESTED_SCOPE",
                RequestingDevice => "INVALID_REQUESTING_DEVICE",
                RequestingOrganization => "INVALID_REQUESTING_ORGANIZATION",
                RequestingPractitioner => "INVALID_REQUESTING_PRACTITIONER",
                RequestedRecord => "INVALID_REQUESTED_RECORD",
            },
            Violation::ExpIat => "EXP_IAT_NOT_300",
            Violation::Expired => "EXPIRED",
            Violation::IssuedInFuture => "IAT_IN_FUTURE",
            Violation::ScopeForInteraction => "SCOPE_FOR_INTERACTION",
            Violation::SubNotPractitioner => "SUB_NOT_PRACTITIONER_ID",
            Violation::Audience => "AUD_MISMATCH",
            Violation::OdsIdentifier => "ODS_IDENTIFIER",
            Violation::SdsUserId => "SDS_USER_ID",
            Violation::UnexpectedRequestedRecord => "UNEXPECTED_REQUESTED_RECORD",
        }
    }
}

/// What the audit trail keeps of a token: the claims that answer who, where from, why, when and to whom, plus
/// whether it was valid and why not. Never logged operationally.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JwtAudit {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<String>,
    pub iat: Option<i64>,
    pub exp: Option<i64>,
    pub reason_for_request: Option<String>,
    pub requested_scope: Option<String>,
    pub organization_ods: Option<String>,
    pub organization_name: Option<String>,
    pub practitioner_id: Option<String>,
    pub sds_user_id: Option<String>,
    pub sds_role_profile_id: Option<String>,
    /// `system|value` of the device's first identifier.
    pub device_identifier: Option<String>,
    pub device_model: Option<String>,
    pub device_version: Option<String>,
    /// The header's `alg` (`none` for GP Connect's unsigned tokens).
    pub alg: Option<String>,
    pub valid: bool,
    /// Every violation, in the order found (the first is the error text); recorded by name as `violations`.
    #[serde(rename = "violations", serialize_with = "by_name")]
    pub found: Vec<Violation>,
}

fn by_name<S: serde::Serializer>(found: &[Violation], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(found.iter().map(|v| v.name()))
}

impl JwtAudit {
    /// The violations' names, in order.
    pub fn violations(&self) -> Vec<&'static str> {
        self.found.iter().map(|v| v.name()).collect()
    }

    /// The first violation, which an enforcing proxy reports.
    pub fn first_violation(&self) -> Option<Violation> {
        self.found.first().copied()
    }

    fn violate(&mut self, v: Violation) {
        if !self.found.contains(&v) {
            self.found.push(v);
        }
    }
}

/// A public key registered for a system's signed tokens.
#[derive(Clone)]
pub struct VerifyingKey {
    key: jsonwebtoken::DecodingKey,
    /// The algorithms this key may verify.
    algorithms: Vec<jsonwebtoken::Algorithm>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Signing algorithms accepted for signed tokens.
const RSA_ALGS: [jsonwebtoken::Algorithm; 3] = [
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::RS512,
    jsonwebtoken::Algorithm::PS256,
];

/// Loads verifying keys from a PEM public key (RSA or EC P-256) or a JWKS file (`{"keys": [...]}`).
pub fn load_keys(path: &Path) -> Result<Vec<VerifyingKey>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_keys(&bytes, path)
}

/// Parses verifying keys from the bytes of a PEM public key or a JWKS file; `path` names it in errors.
pub fn parse_keys(bytes: &[u8], path: &Path) -> Result<Vec<VerifyingKey>, String> {
    if bytes.trim_ascii_start().starts_with(b"{") {
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(bytes)
            .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("{}: unusable JWK: {e}", path.display()))?;
            let algorithms = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                    vec![jsonwebtoken::Algorithm::ES256]
                }
                _ => RSA_ALGS.to_vec(),
            };
            keys.push(VerifyingKey { key, algorithms });
        }
        if keys.is_empty() {
            return Err(format!("{}: the JWKS has no keys", path.display()));
        }
        return Ok(keys);
    }
    if let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(bytes) {
        return Ok(vec![VerifyingKey {
            key,
            algorithms: RSA_ALGS.to_vec(),
        }]);
    }
    if let Ok(key) = jsonwebtoken::DecodingKey::from_ec_pem(bytes) {
        return Ok(vec![VerifyingKey {
            key,
            algorithms: vec![jsonwebtoken::Algorithm::ES256],
        }]);
    }
    Err(format!(
        "{}: not a PEM RSA or EC public key, nor a JWKS",
        path.display()
    ))
}

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
    /// Decodes and validates the value of an `Authorization` header (or its absence).
    pub fn check(&self, authorization: Option<&[u8]>, expect: &Expect<'_>) -> JwtAudit {
        let mut audit = JwtAudit::default();
        let token = match bearer_token(authorization) {
            Ok(token) => token,
            Err(v) => {
                audit.violate(v);
                return audit;
            }
        };
        let checked = Parts::split(token).and_then(|parts| {
            let (header, claims) = (parts.header()?, parts.payload()?);
            audit.alg = Some(parts.check(&header, expect.keys)?.to_owned());
            self.validate(&claims, expect, &mut audit);
            Ok(())
        });
        if let Err(v) = checked {
            audit.violate(v);
        }
        audit.valid = audit.found.is_empty();
        audit
    }

    fn validate(&self, claims: &Obj<'_>, expect: &Expect<'_>, audit: &mut JwtAudit) {
        let mut c = Claims { map: claims, audit };
        let iss = c.string(Claim::Iss);
        c.audit.iss = iss.map(str::to_owned);
        let sub = c.string(Claim::Sub);
        c.audit.sub = sub.map(str::to_owned);
        let aud = c.string(Claim::Aud);
        c.audit.aud = aud.map(str::to_owned);
        let exp = c.integer(Claim::Exp);
        let iat = c.integer(Claim::Iat);
        c.audit.exp = exp;
        c.audit.iat = iat;
        let reason = c.string(Claim::ReasonForRequest);
        c.audit.reason_for_request = reason.map(str::to_owned);
        let scope = c.string(Claim::RequestedScope);
        c.audit.requested_scope = scope.map(str::to_owned);
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
            let migrating = expect.interaction.as_str().contains("migrate");
            if !(reason == "directcare" || (reason == "migration" && migrating)) {
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
                    c.audit.device_identifier = Some(format!("{system}|{value}"));
                    c.audit.device_model = Some(model.to_owned());
                    c.audit.device_version = Some(version.to_owned());
                }
                _ => c.audit.violate(Violation::Invalid(Claim::RequestingDevice)),
            }
        }
        if let Some(org) = organization {
            c.audit.organization_name = org.get("name").and_then(Json::as_str).map(str::to_owned);
            match identifier_value(org, self.profile.ods_system()) {
                Some(ods) => c.audit.organization_ods = Some(ods.to_owned()),
                None => c.audit.violate(Violation::OdsIdentifier),
            }
        }
        if let Some(practitioner) = practitioner {
            let id = practitioner
                .get("id")
                .and_then(Json::as_str)
                .filter(|id| !id.is_empty());
            c.audit.practitioner_id = id.map(str::to_owned);
            if id.is_none() {
                c.audit
                    .violate(Violation::Invalid(Claim::RequestingPractitioner));
            }
            if sub.is_some() && id.is_some() && sub != id {
                c.audit.violate(Violation::SubNotPractitioner);
            }
            // `UNK` is the documented value for an unknown SDS id and is accepted.
            match identifier_value(practitioner, self.profile.sds_user_system()) {
                Some(sds) => c.audit.sds_user_id = Some(sds.to_owned()),
                None => c.audit.violate(Violation::SdsUserId),
            }
            c.audit.sds_role_profile_id =
                identifier_value(practitioner, self.profile.sds_role_system()).map(str::to_owned);
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
        let record = claims.get(Claim::RequestedRecord.key());
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
    map: &'a Obj<'a>,
    audit: &'b mut JwtAudit,
}

impl<'a> Claims<'a, '_> {
    fn get(&mut self, claim: Claim) -> Option<&'a Json<'a>> {
        let value = self.map.get(claim.key());
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
    fn resource(&mut self, claim: Claim, kind: &str) -> Option<&'a Obj<'a>> {
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

fn identifiers<'a>(resource: &'a Obj<'_>) -> impl Iterator<Item = (&'a str, &'a str)> {
    resource
        .get("identifier")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i.get("system")?.as_str()?, i.get("value")?.as_str()?)))
}

fn first_identifier<'a>(resource: &'a Obj<'_>) -> Option<(&'a str, &'a str)> {
    identifiers(resource)
        .next()
        .filter(|(s, v)| !s.is_empty() && !v.is_empty())
}

fn identifier_value<'a>(resource: &'a Obj<'_>, system: &str) -> Option<&'a str> {
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
    let op = urn
        .trim_start_matches("structured:")
        .trim_start_matches("documents:");
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

/// The token of an `Authorization` field value: `Bearer`, in any case, then one or more spaces, then the token
/// (RFC 6750 section 2.1: `credentials = "Bearer" 1*SP b64token`). No field, or a field of another scheme, is
/// `MissingToken`; a `Bearer` field that is not in that shape (a TAB, no token, not UTF-8) is `Malformed`.
pub fn bearer_token(authorization: Option<&[u8]>) -> Result<&str, Violation> {
    let value = authorization.ok_or(Violation::MissingToken)?;
    const SCHEME: &[u8] = b"bearer";
    let is_bearer = value.len() >= SCHEME.len()
        && value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME)
        && value
            .get(SCHEME.len())
            .is_none_or(|b| !b.is_ascii_alphanumeric());
    if !is_bearer {
        return Err(Violation::MissingToken);
    }
    let rest = std::str::from_utf8(&value[SCHEME.len()..]).map_err(|_| Violation::Malformed)?;
    let token = rest.trim_start_matches(' ');
    if token.len() == rest.len() || token.is_empty() {
        return Err(Violation::Malformed);
    }
    Ok(token)
}

/// Decodes a token: three base64url parts without padding. Unsigned unless `keys` are given, in which case it must
/// carry a signature that one of them verifies. Returns the header's `alg` and the claims object.
pub fn decode(
    token: &str,
    keys: Option<&[VerifyingKey]>,
) -> Result<(String, Map<String, Value>), Violation> {
    let parts = Parts::split(token)?;
    let (header, claims) = (parts.header()?, parts.payload()?);
    let alg = parts.check(&header, keys)?;
    Ok((alg.to_owned(), claims.to_map()))
}

/// A token cut into its three parts, the first two base64-decoded. The JSON read from them borrows these bytes.
struct Parts<'t> {
    token: &'t str,
    header: Vec<u8>,
    payload: Vec<u8>,
    signature: &'t str,
}

impl<'t> Parts<'t> {
    fn split(token: &'t str) -> Result<Self, Violation> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Violation::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Violation::Malformed);
        };
        Ok(Self {
            token,
            header: base64url(header)?,
            payload: base64url(payload)?,
            signature,
        })
    }

    fn header(&self) -> Result<Obj<'_>, Violation> {
        json_object(&self.header)
    }

    fn payload(&self) -> Result<Obj<'_>, Violation> {
        json_object(&self.payload)
    }

    /// Checks the header (read by [`Parts::header`]) and the signature, or its absence; the header's `alg`.
    fn check<'h>(
        &self,
        header: &'h Obj<'h>,
        keys: Option<&[VerifyingKey]>,
    ) -> Result<&'h str, Violation> {
        let (token, signature) = (self.token, self.signature);
        let alg = header.get("alg").and_then(Json::as_str).unwrap_or_default();
        let typ_ok = header.get("typ").and_then(Json::as_str) == Some("JWT");
        match keys {
            None => {
                // Exactly {"alg":"none","typ":"JWT"}, in any key order, nothing more.
                if alg != "none" || !typ_ok || header.len() != 2 {
                    return Err(Violation::Header);
                }
                if !signature.is_empty() {
                    return Err(Violation::UnexpectedSignature);
                }
            }
            Some(keys) => {
                if alg == "none" || signature.is_empty() {
                    return Err(Violation::SignatureRequired);
                }
                let algorithm: jsonwebtoken::Algorithm =
                    alg.parse().map_err(|_| Violation::Header)?;
                if !typ_ok || !keys.iter().any(|k| k.algorithms.contains(&algorithm)) {
                    return Err(Violation::Header);
                }
                if !is_base64url(signature) {
                    return Err(Violation::Malformed);
                }
                let mut validation = jsonwebtoken::Validation::new(algorithm);
                // Claims are validated by the profile rules, not by jsonwebtoken's defaults.
                validation.required_spec_claims.clear();
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation.validate_aud = false;
                let verified = keys
                    .iter()
                    .filter(|k| k.algorithms.contains(&algorithm))
                    .any(|k| {
                        jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation)
                            .is_ok()
                    });
                if !verified {
                    return Err(Violation::BadSignature);
                }
            }
        }
        Ok(alg)
    }
}

fn is_base64url(part: &str) -> bool {
    part.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One base64url part (no padding, no `+` or `/`), decoded.
fn base64url(part: &str) -> Result<Vec<u8>, Violation> {
    if part.is_empty() || !is_base64url(part) {
        return Err(Violation::Malformed);
    }
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Violation::Malformed)
}

/// A JSON object whose keys are distinct at every depth, read from `bytes` and borrowing its strings from them.
fn json_object(bytes: &[u8]) -> Result<Obj<'_>, Violation> {
    // serde_json bounds nesting (128 levels) and the token size bounds everything else.
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let parsed = <Json<'_> as serde::Deserialize>::deserialize(&mut reader)
        .and_then(|value| reader.end().map(|()| value));
    match parsed {
        Ok(Json::Obj(map)) => Ok(map),
        Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => Err(Violation::DuplicateKey),
        _ => Err(Violation::Malformed),
    }
}

const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value read from a token: strings borrow the decoded bytes unless they hold escapes, and objects keep
/// their members in order. Objects that repeat a key are refused while reading: two readers of the same token (this
/// proxy and the provider) must not be able to see different claims.
#[derive(Debug, Clone, PartialEq)]
enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    Big(u64),
    Float(f64),
    Str(std::borrow::Cow<'a, str>),
    Arr(Vec<Json<'a>>),
    Obj(Obj<'a>),
}

/// A JSON object's members, in order, keys distinct.
#[derive(Debug, Clone, PartialEq, Default)]
struct Obj<'a>(Vec<(std::borrow::Cow<'a, str>, Json<'a>)>);

impl<'a> Obj<'a> {
    fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn to_map(&self) -> Map<String, Value> {
        self.0
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_value()))
            .collect()
    }

    /// True when two members share a key: pairwise for a small object, sorted for a large one.
    fn repeats_a_key(&self) -> bool {
        let keys = &self.0;
        if keys.len() <= 16 {
            return keys
                .iter()
                .enumerate()
                .any(|(i, (k, _))| keys[..i].iter().any(|(other, _)| other == k));
        }
        let mut sorted: Vec<&str> = keys.iter().map(|(k, _)| k.as_ref()).collect();
        sorted.sort_unstable();
        sorted.windows(2).any(|w| w[0] == w[1])
    }
}

impl<'a> Json<'a> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Like `serde_json::Value::as_i64`: an integer that fits, never a float.
    fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Int(n) => Some(*n),
            _ => None,
        }
    }

    fn as_object(&self) -> Option<&Obj<'a>> {
        match self {
            Json::Obj(o) => Some(o),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<&[Json<'a>]> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }

    /// A member of an object; `None` for anything else.
    fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.as_object()?.get(key)
    }

    fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(n) => Value::from(*n),
            Json::Big(n) => Value::from(*n),
            Json::Float(f) => Value::from(*f),
            Json::Str(s) => Value::String(s.to_string()),
            Json::Arr(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Obj(o) => Value::Object(o.to_map()),
        }
    }
}

/// An object key, borrowed when it holds no escapes (serde's own `Cow` always copies).
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> serde::Deserialize<'de> for Json<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(v).map_or(Json::Big(v), Json::Int))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float(v))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(std::borrow::Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(std::borrow::Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(std::borrow::Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Arr(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut object = Obj::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value = map.next_value()?;
            object.0.push((key, value));
        }
        if object.repeats_a_key() {
            return Err(serde::de::Error::custom(DUPLICATE_KEY));
        }
        Ok(Json::Obj(object))
    }
}

/// Encodes an unsigned token (`alg: none`) for claims; the inverse of [`decode`] without keys.
pub fn encode_unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: i64 = 1_795_000_000;
    const URL: &str = "https://provider.example/B82617/STU3/1/gpconnect";
    const READ: &str = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1";
    const METADATA: &str = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1";
    const BOOK: &str = "urn:nhs:names:services:gpconnect:fhir:rest:create:appointment-1";

    /// A valid 1.x token's claims (the demo's), issued at `NOW`.
    fn claims() -> Value {
        let (_, map) = decode(&crate::demo::dev_jwt(URL, "patient/*.read"), None).unwrap();
        let mut c = Value::Object(map);
        c["iat"] = json!(NOW);
        c["exp"] = json!(NOW + 300);
        c
    }

    fn validator() -> Validator {
        Validator {
            profile: Profile::GpConnect1,
            max_future_skew: Duration::from_secs(300),
        }
    }

    fn check_token(token: &str, interaction: &str) -> JwtAudit {
        let interaction = InteractionId::parse(interaction).unwrap();
        let header = format!("Bearer {token}");
        validator().check(
            Some(header.as_bytes()),
            &Expect {
                endpoint_url: URL,
                interaction: &interaction,
                now: NOW,
                keys: None,
            },
        )
    }

    fn check(claims: &Value) -> JwtAudit {
        check_token(&encode_unsigned(claims), READ)
    }

    fn names(a: &JwtAudit) -> Vec<&'static str> {
        a.violations()
    }

    fn with(f: impl FnOnce(&mut Value)) -> Vec<&'static str> {
        let mut c = claims();
        f(&mut c);
        names(&check(&c))
    }

    #[test]
    fn a_good_token_is_valid_and_its_claims_are_kept() {
        let a = check(&claims());
        assert!(a.valid, "{:?}", a.violations());
        assert_eq!(a.organization_ods.as_deref(), Some("RXX01"));
        assert_eq!(a.organization_name.as_deref(), Some("Example Hospital"));
        assert_eq!(a.sds_user_id.as_deref(), Some("111222333444"));
        assert_eq!(a.sds_role_profile_id.as_deref(), Some("444555666777"));
        assert_eq!(a.practitioner_id.as_deref(), Some("1"));
        assert_eq!(
            a.device_identifier.as_deref(),
            Some("https://consumer.dev.localhost/Id/device|demo-1")
        );
        assert_eq!((a.iat, a.exp), (Some(NOW), Some(NOW + 300)));
        assert_eq!(a.alg.as_deref(), Some("none"));
    }

    #[test]
    fn every_required_claim_is_required() {
        for key in [
            "iss",
            "sub",
            "aud",
            "exp",
            "iat",
            "reason_for_request",
            "requested_scope",
            "requesting_device",
            "requesting_organization",
            "requesting_practitioner",
        ] {
            let v = with(|c| {
                c.as_object_mut().unwrap().remove(key);
            });
            assert!(
                v.contains(&format!("MISSING_{}", key.to_uppercase()).as_str()),
                "{key}: {v:?}"
            );
        }
    }

    #[test]
    fn exp_is_iat_plus_300_exactly() {
        for (delta, ok) in [(300, true), (299, false), (301, false), (-1, false)] {
            let v = with(|c| c["exp"] = json!(NOW + delta));
            assert_eq!(!v.contains(&"EXP_IAT_NOT_300"), ok, "delta {delta}: {v:?}");
        }
    }

    #[test]
    fn expired_and_future_tokens() {
        let v = with(|c| {
            c["iat"] = json!(NOW - 301);
            c["exp"] = json!(NOW - 1);
        });
        assert_eq!(v, vec!["EXPIRED"]);
        // Issued 200 s ahead passes, as the provider suite expects; beyond the skew fails.
        let v = with(|c| {
            c["iat"] = json!(NOW + 200);
            c["exp"] = json!(NOW + 500);
        });
        assert!(v.is_empty(), "{v:?}");
        let v = with(|c| {
            c["iat"] = json!(NOW + 301);
            c["exp"] = json!(NOW + 601);
        });
        assert_eq!(v, vec!["IAT_IN_FUTURE"]);
        assert_eq!(with(|c| c["iat"] = json!(1.5)), vec!["INVALID_IAT"]);
        assert_eq!(
            with(|c| c["exp"] = json!("1795000300")),
            vec!["INVALID_EXP"]
        );
    }

    #[test]
    fn hostile_tokens_are_refused_by_name() {
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let token = |payload: &str| format!("{h}.{}.", URL_SAFE_NO_PAD.encode(payload));
        // Huge: refused before any decoding.
        let huge = token(&format!(r#"{{"iss":"{}"}}"#, "a".repeat(MAX_TOKEN_BYTES)));
        assert_eq!(names(&check_token(&huge, READ)), vec!["TOO_LARGE"]);
        // Deeply nested: serde_json's depth limit, not the stack.
        let deep = format!(r#"{{"iss":{}1{}}}"#, "[".repeat(5_000), "]".repeat(5_000));
        assert!(token(&deep).len() < MAX_TOKEN_BYTES);
        assert_eq!(names(&check_token(&token(&deep), READ)), vec!["MALFORMED"]);
        // A repeated claim, at the top or inside a resource, and a repeated header key.
        let mut text = claims().to_string();
        text.insert_str(1, r#""sub":"someone-else","#);
        assert_eq!(
            names(&check_token(&token(&text), READ)),
            vec!["DUPLICATE_KEY"]
        );
        let nested = claims().to_string().replacen(
            r#""resourceType":"Practitioner""#,
            r#""resourceType":"Practitioner","resourceType":"Patient""#,
            1,
        );
        assert_ne!(nested, claims().to_string());
        assert_eq!(
            names(&check_token(&token(&nested), READ)),
            vec!["DUPLICATE_KEY"]
        );
        let dup_header = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_eq!(
            names(&check_token(&dup_header, READ)),
            vec!["DUPLICATE_KEY"]
        );
        // A key spelt with an escape is the same key; and a large object is checked as well as a small one.
        let escaped = claims().to_string().replacen('{', r#"{"s\u0075b":"x","#, 1);
        assert_eq!(
            names(&check_token(&token(&escaped), READ)),
            vec!["DUPLICATE_KEY"]
        );
        let mut large = claims();
        for i in 0..40 {
            large[format!("x-{i}")] = json!(i);
        }
        assert!(check_token(&token(&large.to_string()), READ).valid);
        let repeated = large.to_string().replacen('{', r#"{"x-17":0,"#, 1);
        assert_eq!(
            names(&check_token(&token(&repeated), READ)),
            vec!["DUPLICATE_KEY"]
        );
        // Wrong types: a number for a string, a string for a number, an array for a resource.
        for (claim, value, name) in [
            ("iss", json!(42), "INVALID_ISS"),
            ("iat", json!("1795000000"), "INVALID_IAT"),
            (
                "requesting_device",
                json!([1, 2]),
                "INVALID_REQUESTING_DEVICE",
            ),
        ] {
            let mut c = claims();
            c[claim] = value;
            assert!(
                names(&check_token(&encode_unsigned(&c), READ)).contains(&name),
                "{claim}"
            );
        }
        // Not an object, and trailing bytes after one.
        assert_eq!(names(&check_token(&token("[1]"), READ)), vec!["MALFORMED"]);
        let trailing = format!("{} x", claims());
        assert_eq!(
            names(&check_token(&token(&trailing), READ)),
            vec!["MALFORMED"]
        );
    }

    #[test]
    fn token_shape_is_strict() {
        let good = encode_unsigned(&claims());
        let (h, rest) = good.split_once('.').unwrap();
        let p = rest.trim_end_matches('.');
        // Raw JSON instead of base64url.
        assert_eq!(
            names(&check_token(
                &format!("{}.{}.", r#"{"alg":"none"}"#, claims()),
                READ
            )),
            vec!["MALFORMED"]
        );
        // Padding, and the standard alphabet.
        assert_eq!(
            names(&check_token(&format!("{h}=.{p}."), READ)),
            vec!["MALFORMED"]
        );
        let standard =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(claims().to_string());
        if standard.contains(['+', '/']) {
            assert_eq!(
                names(&check_token(&format!("{h}.{standard}."), READ)),
                vec!["MALFORMED"]
            );
        }
        assert_eq!(
            names(&check_token(&format!("{h}.{p}+."), READ)),
            vec!["MALFORMED"]
        );
        // Two parts, four parts.
        assert_eq!(
            names(&check_token(&format!("{h}.{p}"), READ)),
            vec!["MALFORMED"]
        );
        assert_eq!(
            names(&check_token(&format!("{h}.{p}..x"), READ)),
            vec!["MALFORMED"]
        );
        // A non-empty signature on an unsigned token.
        assert_eq!(
            names(&check_token(&format!("{h}.{p}.c2ln"), READ)),
            vec!["UNEXPECTED_SIGNATURE"]
        );
        // Wrong alg, missing typ, extra header fields.
        for header in [
            r#"{"alg":"HS256","typ":"JWT"}"#,
            r#"{"alg":"none"}"#,
            r#"{"alg":"none","typ":"JWT","kid":"1"}"#,
        ] {
            let h = URL_SAFE_NO_PAD.encode(header);
            assert_eq!(
                names(&check_token(&format!("{h}.{p}."), READ)),
                vec!["HEADER"],
                "{header}"
            );
        }
        // A JSON array is not a claims object.
        let arr = URL_SAFE_NO_PAD.encode("[1]");
        assert_eq!(
            names(&check_token(&format!("{h}.{arr}."), READ)),
            vec!["MALFORMED"]
        );
        // Too large.
        let big = "a".repeat(MAX_TOKEN_BYTES);
        assert_eq!(
            names(&check_token(&format!("{h}.{big}."), READ)),
            vec!["TOO_LARGE"]
        );
    }

    #[test]
    fn bearer_takes_one_or_more_spaces_and_nothing_else() {
        assert_eq!(bearer_token(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some(b"bEaReR    abc")), Ok("abc"));
        assert_eq!(bearer_token(None), Err(Violation::MissingToken));
        assert_eq!(
            bearer_token(Some(b"Basic abc")),
            Err(Violation::MissingToken)
        );
        assert_eq!(
            bearer_token(Some(b"Bearerx abc")),
            Err(Violation::MissingToken)
        );
        for malformed in [
            &b"Bearer\tabc"[..],
            b"Bearer",
            b"Bearer   ",
            b"Bearer \xff",
            b"Bearer\t abc",
        ] {
            assert_eq!(
                bearer_token(Some(malformed)),
                Err(Violation::Malformed),
                "{:?}",
                String::from_utf8_lossy(malformed)
            );
        }
    }

    #[test]
    fn missing_or_other_scheme_is_missing_token() {
        let interaction = InteractionId::parse(READ).unwrap();
        let expect = Expect {
            endpoint_url: URL,
            interaction: &interaction,
            now: NOW,
            keys: None,
        };
        assert_eq!(
            names(&validator().check(None, &expect)),
            vec!["MISSING_TOKEN"]
        );
        assert_eq!(
            names(&validator().check(Some(b"Basic abc"), &expect)),
            vec!["MISSING_TOKEN"]
        );
        let lower = format!("bearer {}", encode_unsigned(&claims()));
        assert!(validator().check(Some(lower.as_bytes()), &expect).valid);
    }

    #[test]
    fn reason_and_scope() {
        assert_eq!(
            with(|c| c["reason_for_request"] = json!("secondaryuses")),
            vec!["INVALID_REASON_FOR_REQUEST"]
        );
        assert_eq!(
            with(|c| c["requested_scope"] = json!("patient/*.delete")),
            vec!["INVALID_REQUESTED_SCOPE"]
        );
        assert_eq!(
            with(|c| c["requested_scope"] = json!("patient/*.read conf/X")),
            vec!["INVALID_REQUESTED_SCOPE"]
        );
        assert!(with(|c| c["requested_scope"] = json!("patient/*.read conf/N")).is_empty());
        // Scope not fitting the interaction: organization read for a patient read, read for a booking.
        assert_eq!(
            with(|c| c["requested_scope"] = json!("organization/*.read")),
            vec!["SCOPE_FOR_INTERACTION"]
        );
        let mut c = claims();
        c["requested_scope"] = json!("patient/*.read");
        assert_eq!(
            names(&check_token(&encode_unsigned(&c), BOOK)),
            vec!["SCOPE_FOR_INTERACTION"]
        );
        c["requested_scope"] = json!("patient/*.write");
        assert!(check_token(&encode_unsigned(&c), BOOK).valid);
        c["requested_scope"] = json!("organization/*.read");
        assert!(check_token(&encode_unsigned(&c), METADATA).valid);
    }

    #[test]
    fn sub_resource_types_and_identifier_systems() {
        assert_eq!(
            with(|c| c["sub"] = json!("2")),
            vec!["SUB_NOT_PRACTITIONER_ID"]
        );
        assert_eq!(
            with(|c| c["requesting_device"]["resourceType"] = json!("Organization")),
            vec!["INVALID_REQUESTING_DEVICE"]
        );
        assert_eq!(
            with(|c| c["requesting_practitioner"]["resourceType"] = json!("Patient")),
            vec!["INVALID_REQUESTING_PRACTITIONER"]
        );
        assert_eq!(
            with(|c| c["requesting_organization"] = json!("RXX01")),
            vec!["INVALID_REQUESTING_ORGANIZATION"]
        );
        assert_eq!(
            with(
                |c| c["requesting_organization"]["identifier"][0]["system"] =
                    json!("http://fhir.nhs.net/Id/ods-organization-code")
            ),
            vec!["ODS_IDENTIFIER"]
        );
        assert_eq!(
            with(
                |c| c["requesting_practitioner"]["identifier"][0]["system"] =
                    json!("http://fhir.nhs.net/sds-user-id")
            ),
            vec!["SDS_USER_ID"]
        );
        // UNK is accepted for both SDS ids, and the role profile id may be absent.
        let v = with(|c| {
            c["requesting_practitioner"]["identifier"] =
                json!([{ "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "UNK" }]);
        });
        assert!(v.is_empty(), "{v:?}");
        assert!(
            with(|c| c["requesting_practitioner"]["identifier"][1]["value"] = json!("UNK"))
                .is_empty()
        );
    }

    #[test]
    fn audience_by_profile() {
        assert_eq!(
            with(|c| c["aud"] = json!("https://other.example/x")),
            vec!["AUD_MISMATCH"]
        );
        assert_eq!(
            with(|c| c["requested_record"] = json!({"resourceType": "Patient"})),
            vec!["UNEXPECTED_REQUESTED_RECORD"]
        );
        // DSTU2: fixed audience, http://fhir.nhs.net identifier systems, requested_record required.
        let mut c = claims();
        c["aud"] = json!(DSTU2_AUDIENCE);
        c["requesting_organization"]["identifier"][0]["system"] =
            json!("http://fhir.nhs.net/Id/ods-organization-code");
        c["requesting_practitioner"]["identifier"][0]["system"] =
            json!("http://fhir.nhs.net/sds-user-id");
        let dstu2 = Validator {
            profile: Profile::GpConnect07,
            max_future_skew: Duration::from_secs(300),
        };
        let interaction = InteractionId::parse(
            "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getcarerecord",
        )
        .unwrap();
        let expect = Expect {
            endpoint_url: URL,
            interaction: &interaction,
            now: NOW,
            keys: None,
        };
        let run = |c: &Value| {
            dstu2.check(
                Some(format!("Bearer {}", encode_unsigned(c)).as_bytes()),
                &expect,
            )
        };
        assert_eq!(names(&run(&c)), vec!["MISSING_REQUESTED_RECORD"]);
        c["requested_record"] = json!({"resourceType": "Patient", "identifier": []});
        assert!(run(&c).valid, "{:?}", run(&c).violations());
        c["aud"] = json!(URL);
        assert_eq!(names(&run(&c)), vec!["AUD_MISMATCH"]);
    }

    #[test]
    fn required_scopes_follow_the_specification() {
        let scope = |s: &str| {
            required_scope(
                &InteractionId::parse(&format!("urn:nhs:names:services:gpconnect:{s}")).unwrap(),
            )
        };
        assert_eq!(
            scope("fhir:rest:read:metadata-1"),
            Some("organization/*.read")
        );
        assert_eq!(
            scope("structured:fhir:rest:read:metadata-1"),
            Some("organization/*.read")
        );
        assert_eq!(
            scope("fhir:rest:search:slot-1"),
            Some("organization/*.read")
        );
        assert_eq!(scope("fhir:rest:search:patient-1"), Some("patient/*.read"));
        assert_eq!(
            scope("documents:fhir:rest:read:binary-1"),
            Some("patient/*.read")
        );
        assert_eq!(
            scope("fhir:operation:gpc.registerpatient-1"),
            Some("patient/*.write")
        );
        assert_eq!(
            scope("fhir:rest:cancel:appointment-1"),
            Some("patient/*.write")
        );
        assert_eq!(scope("fhir:rest:read:something-new-1"), None);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(token in ".{0,300}") {
            let _ = decode(&token, None);
        }

        #[test]
        fn decoder_never_panics_on_base64ish_input(token in "[A-Za-z0-9_=+/.-]{0,300}") {
            let _ = decode(&token, None);
        }

        #[test]
        fn decode_encode_round_trips(
            iss in "[ -~]{1,40}", sub in "[A-Za-z0-9]{1,12}", iat in 0i64..4_000_000_000,
            extra in proptest::collection::btree_map("[a-z_]{1,10}", "[ -~]{0,20}", 0..5),
        ) {
            let mut c = claims();
            c["iss"] = json!(iss);
            c["sub"] = json!(sub);
            c["iat"] = json!(iat);
            for (k, v) in &extra { c[format!("x_{k}")] = json!(v); }
            let (alg, decoded) = decode(&encode_unsigned(&c), None).unwrap();
            prop_assert_eq!(alg, "none");
            prop_assert_eq!(Value::Object(decoded), c);
        }
    }
}
