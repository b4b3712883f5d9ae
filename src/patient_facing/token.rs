//! The patient's access token: a signed JWT (RFC 7519) verified with `jsonwebtoken` against the JWKS, then the
//! claims this listener requires. What comes out is a [`PatientToken`]: the few values the routing, the limits
//! and the audit record use. The token itself goes nowhere else.

use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use super::jwks::{Found, Jwks};
use crate::audit::patients::Check;
use crate::config::{PatientFacingConfig, Proofing};
use crate::ids::OdsCode;

/// Longest `client_id` or `act.sub` kept.
const MAX_ID: usize = 256;

/// What a verified access token says, as the proxy uses it.
#[derive(Debug, Clone)]
pub struct PatientToken {
    /// The patient's NHS number: ten digits with a valid modulus 11 check digit.
    pub nhs_number: String,
    /// The app the token was issued to (`client_id`, RFC 9068 section 2.2).
    pub client_id: String,
    pub proofing: Proofing,
    /// The acting person of a composite token (`act.sub`, RFC 8693 section 4.1): a proxy user acting for the
    /// patient.
    pub acting: Option<String>,
    /// The patient's GP practice, when the token carries it (`patient_facing.ods_claim`).
    pub practice: Option<OdsCode>,
    /// `exp`, Unix seconds.
    pub expires: i64,
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

/// Verifies `token` (the text after `Bearer `) at the keys in force, then its claims, as `cfg` says.
pub(super) async fn verify(
    token: &str,
    jwks: &Jwks,
    cfg: &PatientFacingConfig,
) -> Result<PatientToken, TokenError> {
    if token.len() > crate::jwt::MAX_TOKEN_BYTES {
        return Err(TokenError::Invalid("too_large"));
    }
    // `alg: none` and unknown algorithms fail here: jsonwebtoken has no `none` (RFC 8725 section 3.1).
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
    claims(&data.claims, cfg)
}

/// The claims this listener requires of a verified token, in the order the refusals are documented.
fn claims(claims: &Value, cfg: &PatientFacingConfig) -> Result<PatientToken, TokenError> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let client_id = text("client_id")
        .filter(|c| !c.is_empty() && c.len() <= MAX_ID && c.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or(TokenError::Invalid("no_client_id"))?
        .to_owned();
    let expires = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let proofing = text("identity_proofing_level")
        .and_then(Proofing::parse)
        .filter(|p| *p >= cfg.min_proofing)
        .ok_or(TokenError::ProofingTooLow)?;
    let scoped = text("scope").is_some_and(|s| s.split(' ').any(|one| one == cfg.scope));
    if !scoped {
        return Err(TokenError::ScopeMissing);
    }
    let nhs_number = text("nhs_number")
        .filter(|n| Check::of(n) == Check::Valid)
        .ok_or(TokenError::NhsNumberMissing)?
        .to_owned();
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
    let practice = cfg.ods_claim.as_ref().and_then(|path| {
        path.iter()
            .try_fold(claims, |at, name| at.get(name))
            .and_then(Value::as_str)
            .and_then(OdsCode::parse)
    });
    Ok(PatientToken {
        nhs_number,
        client_id,
        proofing,
        acting,
        practice,
        expires,
    })
}
