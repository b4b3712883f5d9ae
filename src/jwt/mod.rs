//! The consumer's `Authorization: Bearer` audit token (SSP-DOMAIN.md section 6): a strict decoder for unsigned
//! GP Connect tokens (`alg: none`), signature verification for systems that register keys, and validation of the
//! claims for a profile (`gpconnect-1`, STU3, or `gpconnect-0.7`, DSTU2). The result is a [`JwtAudit`]: the claims
//! that matter for the audit trail, `valid`, and every violation by its stable machine name.
//!
//! `now` is passed in; nothing here reads a clock, touches the network or logs. Tokens and claims never leave
//! this module except inside the `JwtAudit` that goes to the audit trail.
//!
//! - `json`: the strict JSON reader (duplicate keys refused at every depth) that borrows from the token's bytes.
//! - `token`: the `Authorization` field, base64url parts, decoding, signatures and registered keys.
//! - `profile`: the [`Validator`]: the claims GP Connect requires, per profile, into a [`JwtAudit`].

mod json;
mod profile;
mod token;

pub use profile::{Expect, Validator, required_scope};
pub use token::{
    SignedHeader, VerifyingKey, bearer_token, decode, encode_unsigned, load_keys, parse_keys,
    read_signed,
};

use crate::json_writer::ObjectWriter;

/// Largest token read (a typical GP Connect token is about 1.5 KiB).
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The fixed DSTU2 (0.7) audience.
pub(crate) const DSTU2_AUDIENCE: &str = "https://authorize.fhir.nhs.net/token";

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
    const COUNT: usize = 11;

    /// The claim a claims-set key names.
    fn named(key: &[u8]) -> Option<Claim> {
        use Claim::*;
        Some(match key {
            b"iss" => Iss,
            b"sub" => Sub,
            b"aud" => Aud,
            b"exp" => Exp,
            b"iat" => Iat,
            b"reason_for_request" => ReasonForRequest,
            b"requested_scope" => RequestedScope,
            b"requesting_device" => RequestingDevice,
            b"requesting_organization" => RequestingOrganization,
            b"requesting_practitioner" => RequestingPractitioner,
            b"requested_record" => RequestedRecord,
            _ => return None,
        })
    }
}

/// One rule a token broke. `Violation::name` is stable: it appears in `INVALID_JWT_<NAME>` and in the audit
/// record, and operators may alert on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// Longer than `MAX_TOKEN_BYTES`.
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
    pub(crate) fn name(self) -> &'static str {
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

/// A string claim the audit trail keeps, in the order the `jwt` object of a request record lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    Iss,
    Sub,
    Aud,
    ReasonForRequest,
    RequestedScope,
    OrganizationOds,
    OrganizationName,
    PractitionerId,
    SdsUserId,
    SdsRoleProfileId,
    DeviceModel,
    DeviceVersion,
    /// The requesting practitioner's first name's family and first given name: the user a patient's access trail
    /// names.
    PractitionerFamilyName,
    PractitionerGivenName,
}

impl Kept {
    const ALL: [Kept; 14] = [
        Kept::Iss,
        Kept::Sub,
        Kept::Aud,
        Kept::ReasonForRequest,
        Kept::RequestedScope,
        Kept::OrganizationOds,
        Kept::OrganizationName,
        Kept::PractitionerId,
        Kept::SdsUserId,
        Kept::SdsRoleProfileId,
        Kept::DeviceModel,
        Kept::DeviceVersion,
        Kept::PractitionerFamilyName,
        Kept::PractitionerGivenName,
    ];

    /// Its field name in the record.
    pub fn field(self) -> &'static str {
        match self {
            Kept::Iss => "iss",
            Kept::Sub => "sub",
            Kept::Aud => "aud",
            Kept::ReasonForRequest => "reason_for_request",
            Kept::RequestedScope => "requested_scope",
            Kept::OrganizationOds => "organization_ods",
            Kept::OrganizationName => "organization_name",
            Kept::PractitionerId => "practitioner_id",
            Kept::SdsUserId => "sds_user_id",
            Kept::SdsRoleProfileId => "sds_role_profile_id",
            Kept::DeviceModel => "device_model",
            Kept::DeviceVersion => "device_version",
            Kept::PractitionerFamilyName => "practitioner_family_name",
            Kept::PractitionerGivenName => "practitioner_given_name",
        }
    }
}

/// Where a kept claim's text is: a byte range of the decoded claims set (a JSON string without escapes, the
/// usual case, so nothing is copied), or the unescaped text of one with escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClaimText {
    /// A range of the text of a JSON string read without escapes (only `ClaimsBuffer::text` makes one, from a
    /// string the reader returned), so it holds no quote, backslash or control character and is written into a
    /// record as it is.
    At(u32, u32),
    Unescaped(Box<str>),
}

/// What the audit trail keeps of a token: the claims that answer who, where from, why, when and to whom, plus
/// whether it was valid and why not. Never logged operationally.
///
/// It holds the token's decoded claims set once, and the kept claims as places in it, so that validating a token
/// copies none of its strings. Written (in a request record's `jwt`, by [`JwtAudit::write_json`]) as an object
/// with, in this order: `iss`, `sub`, `aud`, `iat`, `exp`, `reason_for_request`, `requested_scope`,
/// `organization_ods`, `organization_name`, `practitioner_id`, `sds_user_id`, `sds_role_profile_id`,
/// `device_identifier` (`system|value` of the device's first identifier), `device_model`, `device_version`, `alg`,
/// `valid` and `violations` (names); a claim that is absent or unusable is `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtAudit {
    /// The decoded claims set (JSON text, checked as UTF-8 once, when decoded); empty when the token could not be
    /// read that far.
    claims: String,
    kept: [Option<ClaimText>; 14],
    /// `system` and `value` of the device's first identifier.
    device_identifier: Option<(ClaimText, ClaimText)>,
    pub iat: Option<i64>,
    pub exp: Option<i64>,
    /// The header's `alg` (`none` for GP Connect's unsigned tokens), one of the algorithms ssp accepts.
    alg: Option<&'static str>,
    pub valid: bool,
    /// Every violation, in the order found (the first is the error text); recorded by name as `violations`.
    pub found: Vec<Violation>,
}

impl JwtAudit {
    /// The violations' names, in order.
    pub(crate) fn violations(&self) -> Vec<&'static str> {
        self.found.iter().map(|v| v.name()).collect()
    }

    /// The first violation, which an enforcing proxy reports.
    pub fn first_violation(&self) -> Option<Violation> {
        self.found.first().copied()
    }

    /// A kept claim's text, when the token had it in a usable form.
    pub fn claim(&self, which: Kept) -> Option<&str> {
        self.text(self.kept[which as usize].as_ref()?)
    }

    /// `system|value` of the device's first identifier, as the record's `device_identifier` reads (tests; the
    /// record writes the two parts without joining them, [`JwtAudit::write_json`]).
    #[cfg(test)]
    pub(crate) fn device_identifier(&self) -> Option<String> {
        let (system, value) = self.device_identifier_parts()?;
        Some(format!("{system}|{value}"))
    }

    /// `system` and `value` of the device's first identifier.
    pub fn device_identifier_parts(&self) -> Option<(&str, &str)> {
        let (system, value) = self.device_identifier.as_ref()?;
        Some((self.text(system)?, self.text(value)?))
    }

    /// The header's `alg`.
    pub fn alg(&self) -> Option<&'static str> {
        self.alg
    }

    /// Writes a kept claim as `"key":"text"`, or `"key":null` when the token did not have it: a range of the
    /// claims set as it is (it needs no escaping, [`ClaimText::At`]), the unescaped copy of one with escapes
    /// escaped again.
    fn write_claim(&self, o: &mut ObjectWriter<'_>, key: &'static str, claim: Option<&ClaimText>) {
        match claim.map(|c| (c, self.text(c))) {
            Some((ClaimText::At(..), Some(text))) => o.verbatim_parts(key, &[text]),
            Some((_, text)) => o.str_or_null(key, text),
            None => o.null(key),
        }
    }

    fn text<'a>(&'a self, text: &'a ClaimText) -> Option<&'a str> {
        match text {
            // A place the JSON reader found a string at, so on character boundaries; `get` checks that anyway.
            ClaimText::At(start, end) => self.claims.get(*start as usize..*end as usize),
            ClaimText::Unescaped(text) => Some(text),
        }
    }

    fn violate(&mut self, v: Violation) {
        if !self.found.contains(&v) {
            self.found.push(v);
        }
    }

    /// Writes the fields of the request record's `jwt` object, in the order the type's documentation gives.
    pub fn write_json(&self, o: &mut ObjectWriter<'_>) {
        let kept = |o: &mut ObjectWriter<'_>, which: &[Kept]| {
            for kept in which {
                self.write_claim(o, kept.field(), self.kept[*kept as usize].as_ref());
            }
        };
        kept(o, &Kept::ALL[..3]);
        o.i64_or_null("iat", self.iat);
        o.i64_or_null("exp", self.exp);
        kept(o, &Kept::ALL[3..10]);
        match (&self.device_identifier, self.device_identifier_parts()) {
            (Some((ClaimText::At(..), ClaimText::At(..))), Some((system, value))) => {
                o.verbatim_parts("device_identifier", &[system, "|", value]);
            }
            (_, Some((system, value))) => o.str_parts("device_identifier", &[system, "|", value]),
            (_, None) => o.null("device_identifier"),
        }
        kept(o, &Kept::ALL[10..]);
        o.str_or_null("alg", self.alg);
        o.bool("valid", self.valid);
        o.strs("violations", self.found.iter().map(|v| v.name()));
    }
}

#[cfg(test)]
mod tests;
