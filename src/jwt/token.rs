//! The token itself: the `Authorization` field, base64url parts, decoding, signatures and registered keys.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::json::{Doc, Json, Obj, json_object, json_text};
use super::{MAX_TOKEN_BYTES, Violation};

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
    let alg = parts.verify(&header, keys)?;
    Ok((alg.to_owned(), claims.root().to_map()))
}

/// What a signed token's header says, read with ssp's strict JSON reader, which also reads its claims set: a
/// duplicate member name at any depth of either refuses the token (RFC 7515 section 4: "Header Parameter names
/// within the JOSE Header MUST be unique"; RFC 7519 section 4 asks the same of claims, and a verifier that takes
/// the last of two `nhs_number`s reads another token than the one meant). For the patient-facing door, before
/// `jsonwebtoken` checks the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeader {
    pub alg: String,
    /// The header names `crit` extensions, none of which ssp understands (RFC 7515 section 4.1.11: refuse).
    pub crit: bool,
}

/// Reads `token`'s header and claims set strictly (see [`SignedHeader`]). Errors: not three base64url parts,
/// not JSON objects, a duplicate member, over [`MAX_TOKEN_BYTES`].
pub fn read_signed(token: &str) -> Result<SignedHeader, Violation> {
    let parts = Parts::split(token)?;
    let header = match parts.header()? {
        Header::Unsigned => SignedHeader {
            alg: "none".into(),
            crit: false,
        },
        Header::Read(doc) => {
            let root = doc.root();
            SignedHeader {
                alg: root
                    .get("alg")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                crit: root.get("crit").is_some(),
            }
        }
    };
    parts.payload()?;
    Ok(header)
}

/// The base64url encoding of GP Connect's unsigned header, `{"alg":"none","typ":"JWT"}`, as nearly every token
/// carries it: recognised as it is, it needs neither decoding nor reading.
const UNSIGNED_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

/// A token's header: the usual unsigned one, recognised by its encoding, or read.
pub(super) enum Header<'h> {
    Unsigned,
    Read(Doc<'h>),
}

/// A token cut into its three parts, the first two base64-decoded. The JSON read from them borrows these bytes.
pub(super) struct Parts<'t> {
    token: &'t str,
    /// The decoded header; none for [`UNSIGNED_HEADER`].
    header: Option<Vec<u8>>,
    /// The decoded claims set: text when it is UTF-8, checked once here, or else its bytes, for
    /// [`json_object`] to name the first fault in.
    payload: Result<String, Vec<u8>>,
    signature: &'t str,
}

impl<'t> Parts<'t> {
    pub(super) fn split(token: &'t str) -> Result<Self, Violation> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Violation::TooLarge);
        }
        let mut dots = memchr::memchr_iter(b'.', token.as_bytes());
        let (Some(first), Some(second), None) = (dots.next(), dots.next(), dots.next()) else {
            return Err(Violation::Malformed);
        };
        Ok(Self {
            token,
            header: match &token[..first] {
                UNSIGNED_HEADER => None,
                other => Some(base64url(other)?),
            },
            payload: String::from_utf8(base64url(&token[first + 1..second])?)
                .map_err(std::string::FromUtf8Error::into_bytes),
            signature: &token[second + 1..],
        })
    }

    /// The decoded claims set, as bytes.
    pub(super) fn payload_bytes(&self) -> &[u8] {
        match &self.payload {
            Ok(text) => text.as_bytes(),
            Err(bytes) => bytes,
        }
    }

    /// The decoded claims set, when it is text ([`Parts::payload`] has read it); empty otherwise.
    pub(super) fn into_payload(self) -> String {
        self.payload.unwrap_or_default()
    }

    pub(super) fn header(&self) -> Result<Header<'_>, Violation> {
        match &self.header {
            None => Ok(Header::Unsigned),
            Some(bytes) => json_object(bytes).map(Header::Read),
        }
    }

    pub(super) fn payload(&self) -> Result<Doc<'_>, Violation> {
        match &self.payload {
            Ok(text) => json_text(text),
            Err(bytes) => json_object(bytes),
        }
    }

    /// Checks the header (read by [`Parts::header`]) and the signature, or its absence; the header's `alg`.
    pub(super) fn verify<'h>(
        &self,
        header: &'h Header<'h>,
        keys: Option<&[VerifyingKey]>,
    ) -> Result<&'h str, Violation> {
        let (token, signature) = (self.token, self.signature);
        let (alg, typ_ok, members) = match header {
            Header::Unsigned => ("none", true, 2),
            Header::Read(doc) => {
                let header: Obj<'h> = doc.root();
                (
                    header.get("alg").and_then(Json::as_str).unwrap_or_default(),
                    header.get("typ").and_then(Json::as_str) == Some("JWT"),
                    header.len(),
                )
            }
        };
        match keys {
            None => {
                // Exactly {"alg":"none","typ":"JWT"}, in any key order, nothing more.
                if alg != "none" || !typ_ok || members != 2 {
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

/// One base64url part (RFC 4648 section 5, no padding: `=`, `+`, `/` and whitespace are refused by the
/// decoder, as are non-zero trailing bits, section 3.5), decoded.
///
/// Why `base64-simd` and not the `base64` crate used elsewhere: this runs on the two parts of every request's
/// token, and its SIMD decoder (AVX2, chosen at run time) took the claims' decode from about a fifth of the token
/// step to a few per cent (`benches/RESULTS.md`); its strict configuration refuses what `base64`'s does
/// (`src/jwt/tests/parts.rs`).
pub(super) fn base64url(part: &str) -> Result<Vec<u8>, Violation> {
    if part.is_empty() {
        return Err(Violation::Malformed);
    }
    base64_simd::URL_SAFE_NO_PAD
        .decode_to_vec(part)
        .map_err(|_| Violation::Malformed)
}

/// Encodes an unsigned token (`alg: none`) for claims; the inverse of [`decode`] without keys.
pub fn encode_unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}
