//! The refusals of the patient-facing listener: each with its status, its code (documented in the integrator's
//! guide beside the clinical ones) and a FHIR R4 `OperationOutcome` body, the convention of the NHS's R4 APIs
//! (`application/fhir+json`). The clinical listener keeps its STU3 bodies (`refusal`).

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::refusal::{X_RATE_LIMIT_LIMIT, X_RATE_LIMIT_REMAINING, X_RATE_LIMIT_RESET};
use crate::forward::{ForwardError, RequestFramingError};
use crate::limits::Throttle;
use crate::patient_facing::{AppThrottled, ExchangeError, RouteMiss, TokenError};
use crate::policy::Denial;
use crate::ssp::TargetError;

/// The code system of the codes below: ssp's own, since no NHS code system holds these refusals.
pub(crate) const CODE_SYSTEM: &str = "urn:ssp:patient-facing:refusal";

/// Why a patient-facing request was not forwarded, or failed upstream before a response.
#[derive(Debug)]
pub(crate) enum PatientRefusal {
    HeadersTooLarge,
    Framing(RequestFramingError),
    /// `X-Request-ID` missing or not a UUID.
    RequestId,
    /// `X-Correlation-ID` not 1 to 256 visible ASCII characters.
    CorrelationId,
    /// An `access_token` query parameter (RFC 6750 section 2.3): refused, not read.
    TokenInQuery,
    Token(TokenError),
    Route(RouteMiss),
    App(AppThrottled),
    /// Neither the token nor the lookup names the patient's practice, or the directory has no endpoint for it.
    PracticeNotFound,
    /// The practice's endpoints do not handle the route's interaction.
    NotAtPractice,
    /// The path does not make a valid target under the practice's endpoint.
    Path(TargetError),
    /// The path or query names an NHS number other than the token's patient.
    OtherPatient,
    /// Checks 5 to 9 on the request as sent by the front's `[[system]]`.
    Denied(Denial),
    Throttled(Throttle),
    /// The endpoint's supplier has no `[[supplier]]` token service in the directory.
    SupplierNotConfigured,
    Exchange(ExchangeError),
    AuditUnavailable,
    Upstream(ForwardError),
    MalformedBody,
}

impl PatientRefusal {
    /// `(status, code, OperationOutcome issue code, label for logs and metrics)`.
    fn parts(&self) -> (StatusCode, &'static str, &'static str, &'static str) {
        use PatientRefusal as R;
        match self {
            R::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "REQUEST_HEADER_FIELDS_TOO_LARGE",
                "too-long",
                "request_header_fields_too_large",
            ),
            R::Framing(RequestFramingError::CodingNotImplemented) => (
                StatusCode::NOT_IMPLEMENTED,
                "TRANSFER_CODING_NOT_IMPLEMENTED",
                "not-supported",
                "transfer_coding_not_implemented",
            ),
            R::Framing(RequestFramingError::Host) => (
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST_FRAMING",
                "invalid",
                "invalid_host",
            ),
            R::Framing(RequestFramingError::ChunkedTwice) => (
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST_FRAMING",
                "invalid",
                "invalid_transfer_encoding",
            ),
            R::RequestId => (
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST_ID",
                "invalid",
                "invalid_request_id",
            ),
            R::CorrelationId => (
                StatusCode::BAD_REQUEST,
                "INVALID_CORRELATION_ID",
                "invalid",
                "invalid_correlation_id",
            ),
            R::TokenInQuery => (
                StatusCode::BAD_REQUEST,
                "ACCESS_TOKEN_IN_QUERY",
                "invalid",
                "access_token_in_query",
            ),
            R::Token(TokenError::Missing) => (
                StatusCode::UNAUTHORIZED,
                "ACCESS_TOKEN_MISSING",
                "login",
                "access_token_missing",
            ),
            R::Token(TokenError::Invalid(_)) => (
                StatusCode::UNAUTHORIZED,
                "ACCESS_TOKEN_INVALID",
                "login",
                "access_token_invalid",
            ),
            R::Token(TokenError::KeysUnavailable) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ACCESS_TOKEN_KEYS_UNAVAILABLE",
                "transient",
                "access_token_keys_unavailable",
            ),
            R::Token(TokenError::ProofingTooLow) => (
                StatusCode::FORBIDDEN,
                "PROOFING_LEVEL_TOO_LOW",
                "forbidden",
                "proofing_level_too_low",
            ),
            R::Token(TokenError::ScopeMissing) => (
                StatusCode::FORBIDDEN,
                "SCOPE_MISSING",
                "forbidden",
                "scope_missing",
            ),
            R::Token(TokenError::NhsNumberMissing) => (
                StatusCode::FORBIDDEN,
                "NHS_NUMBER_MISSING",
                "forbidden",
                "nhs_number_missing",
            ),
            R::Route(RouteMiss::Path) => (
                StatusCode::NOT_FOUND,
                "ROUTE_NOT_FOUND",
                "not-found",
                "route_not_found",
            ),
            R::Route(RouteMiss::Method(_)) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "not-supported",
                "method_not_allowed",
            ),
            R::App(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "APP_RATE_LIMIT",
                "throttled",
                "app_rate_limit",
            ),
            R::PracticeNotFound => (
                StatusCode::NOT_FOUND,
                "PRACTICE_NOT_FOUND",
                "not-found",
                "practice_not_found",
            ),
            R::NotAtPractice => (
                StatusCode::NOT_FOUND,
                "INTERACTION_NOT_AT_PRACTICE",
                "not-supported",
                "interaction_not_at_practice",
            ),
            R::Path(_) => (
                StatusCode::BAD_REQUEST,
                "INVALID_PATH",
                "invalid",
                "invalid_target_url",
            ),
            R::OtherPatient => (
                StatusCode::FORBIDDEN,
                "PATIENT_MISMATCH",
                "forbidden",
                "patient_mismatch",
            ),
            R::Denied(denial) => (
                StatusCode::FORBIDDEN,
                "ACCESS_DENIED",
                "forbidden",
                denial.reason(),
            ),
            R::Throttled(t @ Throttle::ProviderConcurrency { .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "PROVIDER_BUSY",
                "throttled",
                t.reason(),
            ),
            R::Throttled(t) => (
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMIT",
                "throttled",
                t.reason(),
            ),
            R::SupplierNotConfigured => (
                StatusCode::BAD_GATEWAY,
                "SUPPLIER_NOT_CONFIGURED",
                "not-supported",
                "supplier_not_configured",
            ),
            R::Exchange(e) if e.outcome == crate::patient_facing::ExchangeOutcome::Refused => (
                StatusCode::FORBIDDEN,
                "TOKEN_EXCHANGE_REFUSED",
                "forbidden",
                "token_exchange_refused",
            ),
            R::Exchange(_) => (
                StatusCode::BAD_GATEWAY,
                "TOKEN_EXCHANGE_FAILED",
                "transient",
                "token_exchange_failed",
            ),
            R::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "AUDIT_UNAVAILABLE",
                "transient",
                "audit_unavailable",
            ),
            R::Upstream(ForwardError::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                "PROVIDER_TIMEOUT",
                "timeout",
                "timeout_communicating_to_endpoint",
            ),
            R::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "PROVIDER_UNREACHABLE",
                "transient",
                "error_communicating_to_endpoint",
            ),
            R::MalformedBody => (
                StatusCode::BAD_REQUEST,
                "MALFORMED_REQUEST_BODY",
                "invalid",
                "malformed_request_body",
            ),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub(crate) fn code(&self) -> &'static str {
        self.parts().1
    }

    /// A bounded label for logs and metrics (never an identifier).
    pub(crate) fn reason(&self) -> &'static str {
        self.parts().3
    }

    /// What the audit record's `reason` says: the code, and for a token the check that failed.
    pub(crate) fn audit_text(&self) -> String {
        match self {
            PatientRefusal::Token(TokenError::Invalid(why)) => format!("{}: {why}", self.code()),
            PatientRefusal::Denied(denial) => format!("{}: {}", self.code(), denial.reason()),
            PatientRefusal::Path(why) => format!("{}: {why:?}", self.code()),
            _ => self.code().to_owned(),
        }
    }

    /// The answer: status, R4 OperationOutcome, `WWW-Authenticate` on a 401 (RFC 6750 section 3),
    /// `X-Rate-Limit-*` and `Retry-After` on a 429.
    pub(crate) fn respond(&self) -> Response<ProxyBody> {
        let (status, code, issue, _) = self.parts();
        let diagnostics = match self {
            PatientRefusal::Token(TokenError::Invalid(why)) => {
                format!("The access token was refused: {why}.")
            }
            _ => String::new(),
        };
        let body = super::operation_outcome::render_r4(CODE_SYSTEM, code, issue, &diagnostics);
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json; fhirVersion=4.0"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // RFC 6750 section 3: a challenge on 401, and `insufficient_scope` on a 403 for the scope.
        let challenge = match self {
            PatientRefusal::Token(TokenError::Missing) => Some("Bearer"),
            PatientRefusal::Token(TokenError::ScopeMissing) => {
                Some("Bearer error=\"insufficient_scope\"")
            }
            _ if status == StatusCode::UNAUTHORIZED => Some("Bearer error=\"invalid_token\""),
            _ => None,
        };
        if let Some(challenge) = challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        // RFC 9110 section 15.5.6: a 405 names the methods the target allows.
        if let PatientRefusal::Route(RouteMiss::Method(allow)) = self
            && let Ok(value) = HeaderValue::from_str(allow)
        {
            headers.insert(header::ALLOW, value);
        }
        let limits = match self {
            PatientRefusal::App(t) => Some((t.limit, 0, t.reset_s)),
            PatientRefusal::Throttled(t) => Some(t.headers()),
            _ => None,
        };
        if let Some((limit, remaining, reset)) = limits {
            headers.insert(X_RATE_LIMIT_LIMIT, HeaderValue::from(limit));
            headers.insert(X_RATE_LIMIT_REMAINING, HeaderValue::from(remaining));
            headers.insert(X_RATE_LIMIT_RESET, HeaderValue::from(reset));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(reset));
        }
        response
    }
}
