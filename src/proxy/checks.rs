//! Checks 2, 3, 4 and 10 of DESIGN.md 1.4 as single steps, each returning the [`Refusal`] the proxy answers a
//! failure with. The pipeline runs them in order and stops at the first failure; `onboard` runs every one it can
//! and reports each, so that a verdict and the proxy's answer come from the same code.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method};

use super::Refusal;
use crate::config::{JwtConfig, LimitsConfig};
use crate::ids::InteractionId;
use crate::jwt::{Expect, JwtAudit, Mode, Validator, VerifyingKey};
use crate::ssp::{SspFields, SspHeaders, Target};

/// The request checks that need the config but not the policy.
#[derive(Debug)]
pub(crate) struct Checks {
    /// Methods allowed by check 2 (a handful: a scan beats hashing).
    methods: Vec<Method>,
    /// The `Allow` header sent with 405, built once.
    pub(crate) allow: HeaderValue,
    /// Check 10; `None` when `jwt.mode = "off"`.
    jwt: Option<(Mode, Validator)>,
}

/// What check 10 found: the token's audit (none when `jwt.mode = "off"`), and whether a violation refuses the
/// request (`jwt.mode = "enforce"` and at least one violation).
#[derive(Debug)]
pub(crate) struct TokenCheck {
    pub audit: Option<JwtAudit>,
    pub enforced: bool,
}

impl Checks {
    pub(crate) fn new(methods: Vec<Method>, jwt: &JwtConfig) -> Self {
        let allow = methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            allow: HeaderValue::from_str(&allow)
                .unwrap_or_else(|_| HeaderValue::from_static("GET")),
            methods,
            jwt: (jwt.mode != Mode::Off).then_some((
                jwt.mode,
                Validator {
                    profile: jwt.profile,
                    max_future_skew: jwt.max_future_skew,
                },
            )),
        }
    }

    /// Before check 2 (nothing else reads a request too large to be one): at most `limits.max_header_count` fields
    /// and `limits.max_header_bytes` of names and values.
    pub(crate) fn header_limits(headers: &HeaderMap, limits: &LimitsConfig) -> Result<(), Refusal> {
        if headers.len() > limits.max_header_count
            || header_bytes(headers) > limits.max_header_bytes
        {
            Err(Refusal::HeadersTooLarge)
        } else {
            Ok(())
        }
    }

    /// Check 2: the method is one of `server.methods`.
    pub(crate) fn method(&self, method: &Method) -> Result<(), Refusal> {
        if self.methods.contains(method) {
            Ok(())
        } else {
            Err(Refusal::Method)
        }
    }

    /// The methods check 2 allows, as the `Allow` header lists them.
    pub(crate) fn allowed(&self) -> &str {
        self.allow.to_str().unwrap_or("GET")
    }

    /// Check 3: the request target is `/https://host[:port]/path[?query]`, as the target check reads it.
    pub(crate) fn target(path_and_query: &str) -> Result<Target, Refusal> {
        Target::from_request_path(path_and_query).map_err(Refusal::Target)
    }

    /// Check 4: the four `Ssp-*` headers, the first bad one refused.
    pub(crate) fn headers(headers: &HeaderMap) -> Result<SspHeaders, Refusal> {
        SspHeaders::parse(headers).map_err(Refusal::Header)
    }

    /// Check 4 field by field, every bad one as its refusal.
    pub(crate) fn header_fields(headers: &HeaderMap) -> (SspFields, Vec<Refusal>) {
        let fields = SspFields::read(headers);
        let refusals = fields.errors().into_iter().map(Refusal::Header).collect();
        (fields, refusals)
    }

    /// `jwt.mode`.
    pub(crate) fn jwt_mode(&self) -> Mode {
        self.jwt.as_ref().map_or(Mode::Off, |(mode, _)| *mode)
    }

    /// Check 10: decodes and validates the `Authorization` field lines against the endpoint's registered URL, the
    /// interaction and the sender's registered keys, at `now` (Unix seconds). `enforced` is true when a violation
    /// refuses the request (`jwt.mode = "enforce"`); [`TokenCheck::into_result`] makes that refusal.
    pub(crate) fn token(
        &self,
        headers: &HeaderMap,
        endpoint_url: &str,
        interaction: &InteractionId,
        keys: Option<&[VerifyingKey]>,
        now: i64,
    ) -> TokenCheck {
        let Some((mode, validator)) = &self.jwt else {
            return TokenCheck {
                audit: None,
                enforced: false,
            };
        };
        let expect = Expect {
            endpoint_url,
            interaction,
            now,
            keys,
        };
        let audit = validator.validate_lines(
            headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .map(HeaderValue::as_bytes),
            &expect,
        );
        TokenCheck {
            enforced: *mode == Mode::Enforce && !audit.found.is_empty(),
            audit: Some(audit),
        }
    }
}

impl TokenCheck {
    /// The pipeline's reading: an enforced violation is the refusal `INVALID_JWT_<first violation>`, carrying what
    /// was read of the token; otherwise the audit goes on to the record.
    pub(crate) fn into_result(self) -> Result<Option<JwtAudit>, Refusal> {
        match self.audit {
            Some(audit) if self.enforced => match audit.first_violation() {
                Some(v) => Err(Refusal::Jwt(v, Box::new(audit))),
                None => Ok(Some(audit)),
            },
            audit => Ok(audit),
        }
    }
}

/// Bytes of header names and values, as `limits.max_header_bytes` counts them.
pub(crate) fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}
