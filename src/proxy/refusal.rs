//! The one place failures become statuses and responses: [`Refusal`] (every reason a request is not forwarded,
//! or fails upstream before a response), its status, OperationOutcome and headers, its operational log line, and
//! the raw, bounded names a refused request's audit records carry.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;
use super::operation_outcome::{Format, IssueCode, OperationOutcome, Severity};
use crate::forward::{ForwardError, RequestFramingError};
use crate::jwt::{JwtAudit, Violation};
use crate::limits::Throttle;
use crate::policy::Denial;
use crate::ssp::{self, HeaderError, TargetError};

/// Why a request was not forwarded, or failed upstream before a response.
#[derive(Debug)]
pub enum Refusal {
    /// Before check 2: more header bytes or fields than `limits.max_header_bytes` / `max_header_count`.
    HeadersTooLarge,
    /// Before check 2: the request's own framing fields (`Host`, `Transfer-Encoding`; RFC 9112 sections 3.2 and
    /// 6.1).
    Framing(RequestFramingError),
    /// Check 2.
    Method,
    /// Check 3.
    Target(TargetError),
    /// Check 4.
    Header(HeaderError),
    /// Checks 5 to 9.
    Denied(Denial),
    /// Check 10, in enforce mode: the first violation of the audit token, and what was read of it.
    Jwt(Violation, Box<JwtAudit>),
    /// Check 11: a consumer or provider limit; carries the ASID the text names.
    Throttled(Throttle, crate::ids::Asid),
    /// Check 12: the request record could not be written.
    AuditUnavailable,
    /// The provider could not be reached or stayed silent; carries the target text for the error.
    Upstream { error: ForwardError, target: String },
    /// After the request record: the consumer's request body did not parse as its framing says (a malformed
    /// chunked body, RFC 9112 section 7.1). The consumer's fault: 400 and the connection closed.
    MalformedBody,
}

impl Refusal {
    /// A bounded label for logs and metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::HeadersTooLarge => "request_header_fields_too_large",
            Refusal::Framing(RequestFramingError::Host) => "invalid_host",
            Refusal::Framing(RequestFramingError::CodingNotImplemented) => {
                "transfer_coding_not_implemented"
            }
            Refusal::Framing(RequestFramingError::ChunkedTwice) => "invalid_transfer_encoding",
            Refusal::MalformedBody => "malformed_request_body",
            Refusal::Method => "method_not_allowed",
            Refusal::Target(_) => "invalid_target_url",
            Refusal::Header(_) => "missing_or_invalid_header",
            Refusal::Denied(d) => d.reason(),
            Refusal::Jwt(..) => "invalid_jwt",
            Refusal::Throttled(t, _) => t.reason(),
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::Upstream { error, .. } => match error {
                ForwardError::Unreachable(_)
                | ForwardError::HeadTooLarge
                | ForwardError::BadResponse(_)
                | ForwardError::MalformedRequestBody => "error_communicating_to_endpoint",
                ForwardError::Timeout => "timeout_communicating_to_endpoint",
            },
        }
    }

    /// The HTTP status of the failure (DESIGN.md 1.4): the only place a status is chosen for one.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::Framing(RequestFramingError::CodingNotImplemented) => {
                StatusCode::NOT_IMPLEMENTED
            }
            Refusal::Framing(_) | Refusal::MalformedBody => StatusCode::BAD_REQUEST,
            Refusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Target(_) | Refusal::Header(_) | Refusal::Jwt(..) => StatusCode::BAD_REQUEST,
            // Check 9 says the request itself is wrong; 5 to 8 that it is not allowed.
            Refusal::Denied(Denial::TargetVaries { .. }) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::Throttled(Throttle::ProviderConcurrency { .. }, _) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Throttled(..) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream {
                error:
                    ForwardError::Unreachable(_)
                    | ForwardError::HeadTooLarge
                    | ForwardError::BadResponse(_)
                    | ForwardError::MalformedRequestBody,
                ..
            } => StatusCode::BAD_GATEWAY,
            Refusal::Upstream {
                error: ForwardError::Timeout,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The OperationOutcome issue code and severity.
    fn issue(&self) -> (IssueCode, Severity) {
        match self {
            Refusal::HeadersTooLarge => (IssueCode::TooLong, Severity::Error),
            Refusal::Framing(RequestFramingError::CodingNotImplemented) => {
                (IssueCode::NotSupported, Severity::Error)
            }
            Refusal::Framing(_) | Refusal::MalformedBody => (IssueCode::Invalid, Severity::Error),
            Refusal::Method => (IssueCode::Forbidden, Severity::Fatal),
            Refusal::Target(_) | Refusal::Header(_) | Refusal::Jwt(..) => {
                (IssueCode::Invalid, Severity::Error)
            }
            Refusal::Denied(Denial::TargetVaries { .. }) => (IssueCode::Invalid, Severity::Error),
            Refusal::Denied(_) => (IssueCode::Forbidden, Severity::Error),
            Refusal::Throttled(..) => (IssueCode::Throttled, Severity::Error),
            Refusal::AuditUnavailable | Refusal::Upstream { .. } => {
                (IssueCode::Transient, Severity::Error)
            }
        }
    }

    /// The consumer-facing text, exactly as DESIGN.md 1.4 lists it.
    pub(crate) fn text(&self) -> String {
        match self {
            Refusal::HeadersTooLarge => "REQUEST_HEADER_FIELDS_TOO_LARGE".into(),
            Refusal::Framing(RequestFramingError::Host) => "MISSING_OR_INVALID_HEADER_Host".into(),
            Refusal::Framing(RequestFramingError::CodingNotImplemented) => {
                "TRANSFER_CODING_NOT_IMPLEMENTED".into()
            }
            Refusal::Framing(RequestFramingError::ChunkedTwice) => {
                "INVALID_TRANSFER_ENCODING".into()
            }
            Refusal::MalformedBody => "MALFORMED_REQUEST_BODY".into(),
            Refusal::Method => "405: Method Not Allowed".into(),
            Refusal::Target(_) => "INVALID_TARGET_URL".into(),
            Refusal::Header(HeaderError(name)) => format!("MISSING_OR_INVALID_HEADER_{name}"),
            Refusal::Denied(d) => d.text(),
            Refusal::Jwt(v, _) => format!("INVALID_JWT_{}", v.name()),
            Refusal::Throttled(Throttle::ConsumerRate { .. }, from) => {
                format!("RATE_LIMIT_EXCEEDED_MESSAGESENDER_{from}")
            }
            Refusal::Throttled(Throttle::ConsumerConcurrency { .. }, from) => {
                format!("CONCURRENCY_LIMIT_EXCEEDED_MESSAGESENDER_{from}")
            }
            Refusal::Throttled(Throttle::ProviderConcurrency { .. }, to) => {
                format!("PROVIDER_CONCURRENCY_LIMIT_EXCEEDED_MESSAGERECEIVER_{to}")
            }
            Refusal::AuditUnavailable => "AUDIT_UNAVAILABLE".into(),
            Refusal::Upstream {
                error:
                    ForwardError::Unreachable(_)
                    | ForwardError::HeadTooLarge
                    | ForwardError::BadResponse(_)
                    | ForwardError::MalformedRequestBody,
                target,
            } => format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
            Refusal::Upstream {
                error: ForwardError::Timeout,
                target,
            } => format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
        }
    }

    /// The consumer-facing response: an OperationOutcome in the negotiated format, `Cache-Control: no-store`, and
    /// the request's `Ssp-TraceID` echoed when it had one.
    pub(crate) fn respond(
        &self,
        format: Format,
        trace_id: Option<HeaderValue>,
        allow: &HeaderValue,
    ) -> (Response<ProxyBody>, String) {
        let (status, text) = (self.status(), self.text());
        let (code, severity) = self.issue();
        let body = OperationOutcome {
            status: status.as_u16(),
            code,
            severity,
            text: &text,
        }
        .render(format);
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(trace_id) = trace_id {
            headers.insert(ssp::HEADER_TRACE_ID, trace_id);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, allow.clone());
        }
        if let Refusal::Throttled(throttle, _) = self {
            let (limit, remaining, reset) = throttle.headers();
            headers.insert(X_RATE_LIMIT_LIMIT, HeaderValue::from(limit));
            headers.insert(X_RATE_LIMIT_REMAINING, HeaderValue::from(remaining));
            headers.insert(X_RATE_LIMIT_RESET, HeaderValue::from(reset));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(reset));
        }
        (response, text)
    }
}

pub const X_RATE_LIMIT_LIMIT: http::HeaderName =
    http::HeaderName::from_static("x-rate-limit-limit");
pub const X_RATE_LIMIT_REMAINING: http::HeaderName =
    http::HeaderName::from_static("x-rate-limit-remaining");
pub const X_RATE_LIMIT_RESET: http::HeaderName =
    http::HeaderName::from_static("x-rate-limit-reset");
