//! Check 10 for the verdict: the audit token validated by the proxy's validator against the endpoint and sender the
//! headers name, every violation with the fix in the token's terms (the claim's JSON path, the values involved).
//! The token itself is never repeated.

use http::HeaderMap;

use super::{CheckReport, Context, Refused};
use crate::jwt::{Claim, JwtAudit, Mode, Violation};
use crate::proxy::Refusal;
use crate::ssp::SspHeaders;

pub(super) fn check(
    ctx: &Context<'_>,
    headers: &HeaderMap,
    ssp: Option<&SspHeaders>,
) -> CheckReport {
    const NAME: &str = "token";
    if ctx.checks.jwt_mode() == Mode::Off {
        return CheckReport::pass(10, NAME, "jwt.mode = off: tokens are not checked".into());
    }
    let Some(ssp) = ssp else {
        return CheckReport::not_run(
            10,
            NAME,
            "needs a valid Ssp-To and Ssp-InteractionID (check 4)".into(),
        );
    };
    let Some(endpoint) = ctx.policy.endpoint(&ssp.to) else {
        return CheckReport::not_run(
            10,
            NAME,
            format!(
                "needs the endpoint {} (check 7): its registered URL is the token's aud",
                ssp.to
            ),
        );
    };
    let keys = ctx
        .policy
        .system(&ssp.from)
        .and_then(|s| s.jwt_keys.as_deref());
    let now = crate::clock::unix_seconds(ctx.now);
    let checked = ctx
        .checks
        .token(headers, &endpoint.url, &ssp.interaction, keys, now);
    let enforced = checked.enforced;
    let Some(audit) = checked.audit else {
        return CheckReport::pass(10, NAME, "jwt.mode = off: tokens are not checked".into());
    };
    if audit.found.is_empty() {
        return CheckReport::pass(
            10,
            NAME,
            format!(
                "valid for {} (alg {}, expires in {} s)",
                endpoint.url,
                audit.alg().unwrap_or("-"),
                audit.exp.map_or(0, |exp| exp - now)
            ),
        );
    }
    let names: Vec<&str> = audit.found.iter().map(|v| v.name()).collect();
    let mut report = CheckReport::new(10, NAME);
    report.status = super::Status::Fail;
    report.detail = format!("violations: {}", names.join(", "));
    report.fixes = audit
        .found
        .iter()
        .map(|v| {
            format!(
                "{}: {}",
                v.name(),
                fix(*v, &audit, &endpoint.url, &ssp.interaction, now)
            )
        })
        .collect();
    if let Some(first) = audit.first_violation() {
        if enforced {
            report.refusal = Some(Refused::of(&Refusal::Jwt(first, Box::new(audit.clone()))));
        } else {
            // jwt.mode = audit: recorded and forwarded, so a warning rather than a failure.
            report.status = super::Status::Pass;
            report.detail = format!(
                "jwt.mode = audit: forwarded, but recorded as invalid ({})",
                names.join(", ")
            );
        }
    }
    report
}

/// The claim's JSON path in the claims set.
fn path(claim: Claim) -> &'static str {
    match claim {
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

fn fix(
    v: Violation,
    audit: &JwtAudit,
    aud: &str,
    interaction: &crate::ids::InteractionId,
    now: i64,
) -> String {
    match v {
        Violation::MissingToken => "send Authorization: Bearer <token> on every request".into(),
        Violation::TooLarge => format!("the token is over {} bytes", crate::jwt::MAX_TOKEN_BYTES),
        Violation::Malformed => {
            "the token must be three base64url parts (no padding) of JSON objects, in one Authorization field".into()
        }
        Violation::DuplicateKey => "a JSON object in the token repeats a key".into(),
        Violation::Header => "the token's header must be {\"alg\":\"none\",\"typ\":\"JWT\"} (or a registered \
                              signing algorithm for a system with keys)"
            .into(),
        Violation::UnexpectedSignature => "an unsigned token (alg none) must have an empty signature part".into(),
        Violation::SignatureRequired => "this system registered keys: sign the token with one of them".into(),
        Violation::BadSignature => "the signature does not verify with any key registered for this system".into(),
        Violation::Missing(c) => format!("claim {} is missing", path(c)),
        Violation::Invalid(c) => format!("claim {} has the wrong JSON type, is empty, or is not the FHIR resource it must be", path(c)),
        Violation::ExpIat => match (audit.exp, audit.iat) {
            (Some(exp), Some(iat)) => format!("exp - iat is {} (must be 300)", exp - iat),
            _ => "exp - iat must be 300".into(),
        },
        Violation::Expired => match audit.exp {
            Some(exp) => format!("exp passed {} s ago: make a fresh token for each request", now - exp),
            None => "the token has expired".into(),
        },
        Violation::IssuedInFuture => match audit.iat {
            Some(iat) => format!("iat is {} s in the future: check the system's clock", iat - now),
            None => "iat is in the future".into(),
        },
        Violation::ScopeForInteraction => match crate::jwt::required_scope(interaction) {
            Some(scope) => format!(
                "requested_scope is {}; {interaction} needs {scope}",
                audit.claim(crate::jwt::Kept::RequestedScope).unwrap_or("-")
            ),
            None => "requested_scope does not fit the interaction".into(),
        },
        Violation::SubNotPractitioner => "sub must equal requesting_practitioner.id".into(),
        Violation::Audience => format!(
            "aud is {}; it must be the endpoint's registered URL {aud}",
            audit.claim(crate::jwt::Kept::Aud).unwrap_or("-")
        ),
        Violation::OdsIdentifier => "requesting_organization.identifier[] needs an ODS code identifier of the \
                                     profile's system"
            .into(),
        Violation::SdsUserId => "requesting_practitioner.identifier[] needs an SDS user id identifier of the \
                                 profile's system"
            .into(),
        Violation::UnexpectedRequestedRecord => "requested_record is not allowed in a GP Connect 1.x token".into(),
    }
}
