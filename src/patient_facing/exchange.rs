//! The GP supplier's own access token for a patient: an RFC 8693 token exchange at the supplier's token endpoint
//! (from the directory's `[[supplier]]`), the client authenticated with a `private_key_jwt` assertion (RFC 7523
//! section 2.2, with the claims of OpenID Connect Core section 9), cached until `token_refresh_before` ahead of
//! its expiry per supplier (every field of its `[[supplier]]`) and patient's access token: the supplier's token
//! goes only with the very token it was exchanged for, never to a request of another app, of a proxy user acting
//! for the patient, or of a token of another proofing level or scope, whose access the supplier may scope
//! differently; and a `[[supplier]]` changed by a reload exchanges anew. An app sends the same access token until
//! it expires, so its requests after the first find the supplier's token here. One exchange per key at a time:
//! requests that arrive while one is under way wait for its token. A token endpoint that fails (no answer, 5xx, an answer that
//! is not a token response) is not called again for `exchange_backoff`: requests in that time are refused at
//! once (502), so an outage brings no storm of retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Deserialize;

use crate::oneshot;
use crate::policy::Supplier;

/// Most (supplier, patient) tokens kept; past it the expired ones go, then (rarely) all.
const MAX_CACHED: usize = 100_000;
/// A client assertion's lifetime (NHS England's signed-JWT rule for its APIs: at most 5 minutes).
const ASSERTION_LIFETIME_S: i64 = 300;
/// Largest token response read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest supplier token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `expires_in` honoured.
const MAX_EXPIRES_IN_S: u64 = 24 * 3600;

/// RFC 8693 section 2.1's parameter values.
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 7523 section 2.2.
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How the supplier's token was had, as the audit record says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From the cache.
    Cached,
    /// Exchanged for this request.
    Exchanged,
    /// The token endpoint refused the exchange (4xx with an OAuth error).
    Refused,
    /// The token endpoint failed, or was in its back-off after a failure.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Exchanged => "exchanged",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// A supplier token, ready to go in the provider request's `Authorization` field.
#[derive(Debug, Clone)]
pub struct SupplierToken {
    pub authorization: HeaderValue,
    pub outcome: Outcome,
}

/// Why no token was had: the outcome (`Refused` or `Failed`) and what to log (never a token).
#[derive(Debug, Clone)]
pub struct ExchangeError {
    pub outcome: Outcome,
    pub detail: String,
}

/// The key that signs the client assertions (`patient_facing.assertion_key`).
pub(super) struct AssertionKey {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
}

impl std::fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl AssertionKey {
    /// Reads a PEM private key: RSA of 2048 to 8192 bits (signs RS512) or EC P-256 (ES256). Errors name the file
    /// and what is wrong; a key that cannot sign (an EC key on another curve) is refused here, not at the first
    /// exchange. Its mode is [`AssertionKey::exposed`]'s to judge.
    pub(super) fn load(path: &std::path::Path) -> Result<Self, String> {
        let pem = super::read_bounded(path, 64 * 1024)?;
        let key = if let Ok(key) = jsonwebtoken::EncodingKey::from_rsa_pem(&pem) {
            rsa_size_ok(&pem).map_err(|why| format!("{}: {why}", path.display()))?;
            Self {
                key,
                alg: jsonwebtoken::Algorithm::RS512,
            }
        } else if let Ok(key) = jsonwebtoken::EncodingKey::from_ec_pem(&pem) {
            Self {
                key,
                alg: jsonwebtoken::Algorithm::ES256,
            }
        } else {
            return Err(format!(
                "{}: not a PEM RSA or EC P-256 private key",
                path.display()
            ));
        };
        let probe = Supplier {
            name: String::new(),
            token_endpoint: String::new(),
            client_id: String::new(),
            key_id: String::new(),
            audience: String::new(),
        };
        key.assertion(&probe, 0).map_err(|e| {
            format!(
                "{}: cannot sign with it ({e}): an EC key must be on P-256",
                path.display()
            )
        })?;
        Ok(key)
    }

    /// A warning when group or other users may read or write the key file at `path` (it authenticates the proxy
    /// to every supplier: mode 0400 or 0600, owned by the service user). A warning, not a refusal: the
    /// development PKI's keys come out of git as 0644.
    pub(super) fn exposed(path: &std::path::Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        (mode & 0o077 != 0).then(|| {
            format!(
                "patient_facing.assertion_key: {}: mode {:o}: group or others may read it; chmod 0400",
                path.display(),
                mode & 0o777
            )
        })
    }

    /// A client assertion for `supplier`'s token endpoint, valid for five minutes from `now` (Unix seconds).
    fn assertion(&self, supplier: &Supplier, now: i64) -> Result<String, String> {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(supplier.key_id.clone());
        let claims = serde_json::json!({
            "iss": supplier.client_id,
            "sub": supplier.client_id,
            "aud": supplier.token_endpoint,
            "jti": uuid::Uuid::new_v4().to_string(),
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        });
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }
}

/// An RSA key of 2048 to 8192 bits (aws-lc's range for signing; NHS England asks 4096 of API clients).
fn rsa_size_ok(pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem).map_err(|e| e.to_string())?;
    let parsed = match &der {
        rustls_pki_types::PrivateKeyDer::Pkcs8(der) => {
            aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der())
        }
        rustls_pki_types::PrivateKeyDer::Pkcs1(der) => {
            aws_lc_rs::rsa::KeyPair::from_der(der.secret_pkcs1_der())
        }
        _ => return Err("not an RSA private key".into()),
    };
    parsed
        .map(|_| ())
        .map_err(|e| format!("an RSA key must be 2048 to 8192 bits ({e})"))
}

/// What a key's slot remembers, until when.
#[derive(Debug)]
enum Cached {
    /// The supplier's token, used until `token_refresh_before` ahead of its expiry.
    Token {
        authorization: HeaderValue,
        until: Instant,
    },
    /// The supplier refused to exchange this token: it is not asked again for `exchange_backoff`.
    Refused { until: Instant },
}

impl Cached {
    /// What it says now: `None` once it has lapsed.
    fn answer(
        &self,
        supplier: &Supplier,
        backoff: Duration,
    ) -> Option<Result<SupplierToken, ExchangeError>> {
        let now = Instant::now();
        match self {
            Cached::Token {
                authorization,
                until,
            } if now < *until => Some(Ok(SupplierToken {
                authorization: authorization.clone(),
                outcome: Outcome::Cached,
            })),
            Cached::Refused { until } if now < *until => Some(Err(ExchangeError {
                outcome: Outcome::Refused,
                detail: format!(
                    "{}: refused this token's exchange within the last {} s; not asked again yet",
                    supplier.token_endpoint,
                    backoff.as_secs()
                ),
            })),
            _ => None,
        }
    }
}

/// One key's token and the lock that makes its exchange single flight.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// SHA-256 of the supplier's fields and the patient's access token, each length-prefixed: a fixed-size key, so
/// that a cache hit allocates nothing, and no two keys collide in practice.
type CacheKey = [u8; 32];

fn cache_key(supplier: &Supplier, subject_token: &str) -> CacheKey {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [
        supplier.name.as_str(),
        supplier.token_endpoint.as_str(),
        supplier.client_id.as_str(),
        supplier.key_id.as_str(),
        supplier.audience.as_str(),
        subject_token,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
}

/// The exchanges of one patient-facing listener.
#[derive(Debug)]
pub(super) struct Exchanger {
    key: AssertionKey,
    timeout: Duration,
    refresh_before: Duration,
    backoff: Duration,
    slots: Mutex<HashMap<CacheKey, Slot>>,
    /// Suppliers whose token endpoint failed, and until when it is left alone.
    down: Mutex<HashMap<String, Instant>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

impl Exchanger {
    pub(super) fn new(
        key: AssertionKey,
        timeout: Duration,
        refresh_before: Duration,
        backoff: Duration,
    ) -> Self {
        Self {
            key,
            timeout,
            refresh_before,
            backoff,
            slots: Mutex::default(),
            down: Mutex::default(),
        }
    }

    /// The supplier's token for a request with the verified access token `subject_token`, from the cache or
    /// exchanged for it over `tls`.
    pub(super) async fn token(
        &self,
        supplier: &Supplier,
        subject_token: &str,
        tls: Arc<rustls::ClientConfig>,
        resolve: &oneshot::Resolve,
    ) -> Result<SupplierToken, ExchangeError> {
        let slot = self.slot(supplier, subject_token);
        let mut cached = slot.lock().await;
        if let Some(answer) = cached
            .as_ref()
            .and_then(|c| c.answer(supplier, self.backoff))
        {
            return answer;
        }
        let down_until = self
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&supplier.name)
            .copied();
        if down_until.is_some_and(|until| Instant::now() < until) {
            return Err(ExchangeError {
                outcome: Outcome::Failed,
                detail: format!(
                    "{}: failed within the last {} s; not called again yet",
                    supplier.token_endpoint,
                    self.backoff.as_secs()
                ),
            });
        }
        match self.exchange(supplier, subject_token, tls, resolve).await {
            Ok((authorization, lifetime)) => {
                self.down
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&supplier.name);
                *cached = lifetime
                    .and_then(|l| l.checked_sub(self.refresh_before))
                    .map(|keep| Cached::Token {
                        authorization: authorization.clone(),
                        until: Instant::now() + keep,
                    });
                Ok(SupplierToken {
                    authorization,
                    outcome: Outcome::Exchanged,
                })
            }
            Err(e) => {
                if e.outcome == Outcome::Refused {
                    *cached = Some(Cached::Refused {
                        until: Instant::now() + self.backoff,
                    });
                }
                if e.outcome == Outcome::Failed {
                    self.down
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(supplier.name.clone(), Instant::now() + self.backoff);
                }
                Err(e)
            }
        }
    }

    /// What the cache says of this token now, without waiting: `None` when it says nothing (no entry, a lapsed
    /// one, or an exchange under way), and the caller exchanges.
    pub(super) fn cached(
        &self,
        supplier: &Supplier,
        subject_token: &str,
    ) -> Option<Result<SupplierToken, ExchangeError>> {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(slots.get(&cache_key(supplier, subject_token))?)
        };
        let cached = slot.try_lock().ok()?;
        cached.as_ref()?.answer(supplier, self.backoff)
    }

    fn slot(&self, supplier: &Supplier, subject_token: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.len() >= MAX_CACHED {
            // Kept: the slots in use (an exchange holds its lock) and those whose token is still good.
            slots.retain(|_, slot| {
                slot.try_lock().map_or(true, |c| {
                    c.as_ref().is_some_and(|c| match c {
                        Cached::Token { until, .. } | Cached::Refused { until } => {
                            Instant::now() < *until
                        }
                    })
                })
            });
            if slots.len() >= MAX_CACHED {
                slots.clear();
            }
        }
        Arc::clone(slots.entry(cache_key(supplier, subject_token)).or_default())
    }

    /// One exchange: the `Authorization` value and the token's lifetime (`expires_in`), when it said one.
    async fn exchange(
        &self,
        supplier: &Supplier,
        subject_token: &str,
        tls: Arc<rustls::ClientConfig>,
        resolve: &oneshot::Resolve,
    ) -> Result<(HeaderValue, Option<Duration>), ExchangeError> {
        let failed = |detail: String| ExchangeError {
            outcome: Outcome::Failed,
            detail,
        };
        let assertion = self
            .key
            .assertion(supplier, crate::clock::unix_now())
            .map_err(|e| failed(format!("signing the client assertion: {e}")))?;
        let form = oneshot::form(&[
            ("grant_type", GRANT_TYPE),
            ("subject_token", subject_token),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("audience", &supplier.audience),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &assertion),
        ]);
        let url = &supplier.token_endpoint;
        let oneshot::Answer { status, body, .. } = oneshot::call(
            tls,
            resolve,
            oneshot::Call {
                url,
                headers: &[("accept", "application/json")],
                form: Some(form),
                max_bytes: MAX_ANSWER_BYTES,
                timeout: self.timeout,
            },
        )
        .await
        .map_err(failed)?;
        if matches!(status.as_u16(), 400 | 401 | 403) {
            // RFC 6749 section 5.2: the error code is a short ASCII token; only it is logged.
            let code = serde_json::from_slice::<ErrorResponse>(&body)
                .ok()
                .map(|e| e.error)
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
                .unwrap_or_else(|| "unreadable".into());
            return Err(ExchangeError {
                outcome: Outcome::Refused,
                detail: format!("{url}: refused the exchange ({status}, error {code})"),
            });
        }
        if status != http::StatusCode::OK {
            return Err(failed(format!("{url}: answered {status}")));
        }
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| failed(format!("{url}: not a token response")))?;
        let usable = !answer.access_token.is_empty()
            && answer.access_token.len() <= MAX_TOKEN_BYTES
            && answer.access_token.bytes().all(|b| b.is_ascii_graphic())
            && answer.token_type.eq_ignore_ascii_case("bearer");
        if !usable {
            return Err(failed(format!(
                "{url}: the token response's access_token or token_type (Bearer) is not usable"
            )));
        }
        let authorization = HeaderValue::try_from(format!("Bearer {}", answer.access_token))
            .map_err(|_| failed(format!("{url}: the access_token is not a header value")))?;
        let lifetime = answer
            .expires_in
            .filter(|s| (1..=MAX_EXPIRES_IN_S).contains(s))
            .map(Duration::from_secs);
        Ok((authorization, lifetime))
    }
}
