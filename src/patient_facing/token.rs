//! The patient's access token: a signed JWT (RFC 7519) verified with `jsonwebtoken` against the JWKS, then the
//! claims this listener requires. What comes out is a [`PatientToken`]: the few values the routing, the limits
//! and the audit record use. The token itself goes nowhere else.

use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::jwks::{Found, Jwks};
use crate::audit::PatientAccess;
use crate::audit::patients::Check;
use crate::config::{PatientFacingConfig, Proofing};
use crate::ids::OdsCode;

/// Longest `client_id` or `act.sub` kept.
const MAX_ID: usize = 256;
/// Longest an access token may be valid from now (NHS login's last an hour): a token for years is refused.
const MAX_LIFETIME_S: i64 = 24 * 3600;

/// What a verified access token says, as the proxy uses it.
#[derive(Debug, Clone)]
pub struct PatientToken {
    /// The patient's NHS number: ten digits with a valid modulus 11 check digit.
    pub nhs_number: String,
    /// The app the token was issued to (`client_id`, RFC 9068 section 2.2).
    pub client_id: String,
    /// The acting person of a composite token (`act.sub`, RFC 8693 section 4.1): a proxy user acting for the
    /// patient.
    pub acting: Option<String>,
    /// The patient's GP practice, when the token carries it (`patient_facing.ods_claim`).
    pub practice: Option<OdsCode>,
}

/// Why a token was refused; each is one refusal code of the integrator's guide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No `Authorization: Bearer` field.
    Missing,
    /// Refused as a token: the label says why (bounded, for logs and metrics).
    Invalid(&'static str),
    /// No usable key: the JWKS could not be fetched for longer than the stale period.
    KeysUnavailable,
    ProofingTooLow,
    ScopeMissing,
    NhsNumberMissing,
}

/// Verifies `token` (the text after `Bearer `) at the keys in force, then its claims, as `cfg` says; `seen` gets
/// each claim the record names as it is read from a verified token, so that a refusal for a later claim still
/// names the app and patient.
pub(super) async fn verify(
    token: &str,
    jwks: &Jwks,
    cfg: &PatientFacingConfig,
    seen: &mut PatientAccess,
) -> Result<PatientToken, TokenError> {
    if token.len() > crate::jwt::MAX_TOKEN_BYTES {
        return Err(TokenError::Invalid("too_large"));
    }
    // Both parts read strictly first: a duplicate member (two `nhs_number`s, the last of which serde_json would
    // take) or a `crit` extension refuses the token, and `alg: none` is named for what it is.
    let strict = crate::jwt::read_signed(token).map_err(|_| TokenError::Invalid("malformed"))?;
    if strict.alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::Invalid("algorithm_not_allowed"));
    }
    if strict.crit {
        return Err(TokenError::Invalid("crit_not_understood"));
    }
    // Unknown algorithms fail here: jsonwebtoken has no `none` (RFC 8725 section 3.1).
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("malformed"))?;
    if !cfg.algorithms.contains(&header.alg) {
        return Err(TokenError::Invalid("algorithm_not_allowed"));
    }
    let kid = header.kid.as_deref().ok_or(TokenError::Invalid("no_kid"))?;
    let key = match jwks.get_or_fetch(kid).await {
        Found::Key(key) => key,
        Found::Unknown if jwks.is_empty() => return Err(TokenError::KeysUnavailable),
        Found::Unknown => return Err(TokenError::Invalid("unknown_kid")),
    };
    let family_ok = match header.alg {
        Algorithm::RS256 | Algorithm::RS512 => key.rsa,
        Algorithm::ES256 => !key.rsa,
        _ => false,
    };
    if !family_ok || key.alg.is_some_and(|alg| alg != header.alg) {
        return Err(TokenError::Invalid("algorithm_not_allowed"));
    }
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&cfg.issuer]);
    validation.set_audience(&[&cfg.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.leeway = cfg.leeway.as_secs();
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<Value>(token, &key.key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        TokenError::Invalid(match e.kind() {
            ErrorKind::InvalidSignature => "bad_signature",
            ErrorKind::ExpiredSignature => "expired",
            ErrorKind::ImmatureSignature => "not_yet_valid",
            ErrorKind::InvalidIssuer => "wrong_issuer",
            ErrorKind::InvalidAudience => "wrong_audience",
            ErrorKind::MissingRequiredClaim(_) => "missing_claim",
            ErrorKind::InvalidAlgorithm => "algorithm_not_allowed",
            _ => "malformed",
        })
    })?;
    claims(&data.claims, cfg, crate::clock::unix_now(), seen)
}

/// The claims this listener requires of a verified token at `now` (Unix seconds), in the order the refusals are
/// documented; `seen` gets the app, the patient, the proofing level and the acting person as they are read.
fn claims(
    claims: &Value,
    cfg: &PatientFacingConfig,
    now: i64,
    seen: &mut PatientAccess,
) -> Result<PatientToken, TokenError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let client_id = text("client_id")
        .filter(|c| !c.is_empty() && c.len() <= MAX_ID && c.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or(TokenError::Invalid("no_client_id"))?
        .to_owned();
    seen.client_id = Some(client_id.clone());
    // Read as numbers of any JSON form (an integer past i64, a float: jsonwebtoken takes them), so that no form
    // slips past the bounds.
    let (now_f, leeway) = (now as f64, cfg.leeway.as_secs_f64());
    let exp = claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0);
    if exp - now_f > MAX_LIFETIME_S as f64 {
        return Err(TokenError::Invalid("lifetime_too_long"));
    }
    match claims.get("iat") {
        None => {}
        Some(iat) => match iat.as_f64() {
            Some(iat) if iat <= now_f + leeway => {}
            Some(_) => return Err(TokenError::Invalid("issued_in_future")),
            None => return Err(TokenError::Invalid("malformed_iat")),
        },
    }
    let valid_number = text("nhs_number").filter(|n| Check::of(n) == Check::Valid);
    seen.nhs_number = valid_number.map(str::to_owned);
    let proofing_claim = text("identity_proofing_level").and_then(Proofing::parse);
    seen.proofing = proofing_claim.map(Proofing::as_str);
    if proofing_claim.is_none_or(|p| p < cfg.min_proofing) {
        return Err(TokenError::ProofingTooLow);
    }
    let scoped = text("scope").is_some_and(|s| s.split(' ').any(|one| one == cfg.scope));
    if !scoped {
        return Err(TokenError::ScopeMissing);
    }
    let nhs_number = valid_number.ok_or(TokenError::NhsNumberMissing)?.to_owned();
    let acting = match claims.get("act") {
        None => None,
        Some(act) => Some(
            act.get("sub")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty() && s.len() <= MAX_ID && !s.chars().any(char::is_control))
                .ok_or(TokenError::Invalid("malformed_act"))?
                .to_owned(),
        ),
    };
    seen.acting = acting.clone();
    let practice = cfg.ods_claim.as_ref().and_then(|path| {
        path.iter()
            .try_fold(claims, |at, name| at.get(name))
            .and_then(Value::as_str)
            .and_then(OdsCode::parse)
    });
    Ok(PatientToken {
        nhs_number,
        client_id,
        acting,
        practice,
    })
}
