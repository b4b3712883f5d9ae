//! One request, start to finish: the order of the checks of DESIGN.md 1.4 (2 to 9 here; 1 is the handshake in
//! `server`), forwarding, and the one place where a failure becomes a consumer-facing response.
//!
//! Each step consumes the previous step's output: `Request` -> `Target` + `SspHeaders` -> `Permit` ->
//! upstream `Response` -> streamed body. Failures are small [`Refusal`] values with a bounded reason label;
//! [`Refusal::respond`] turns them into OperationOutcomes. No sockets, no parsing details.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::audit::{AuditLog, Completion, Names, Outcome, Record, Transaction};
use crate::config::JwtConfig;
use crate::forward::{BoxError, Direction, Exchange, ForwardError, Streamed, Upstream};
use crate::ids::PeerIdentity;
use crate::jwt::{Expect, JwtAudit, Mode, Validator, Violation};
use crate::limits::{Admission, Limits, Throttle};
use crate::metrics::{Metrics, OTHER};
use crate::outcome::{Format, IssueCode, Outcome as OperationOutcome, Severity};
use crate::policy::{Decision, Denial, Permit, Policy};
use crate::ssp::{self, HeaderError, SspHeaders, SspRequest, Target, TargetError};

/// What the server knows about a consumer connection; read once after the handshake and shared by its requests.
#[derive(Debug)]
pub struct ConnInfo {
    /// Counts connections since start, for correlating log lines.
    pub id: u64,
    pub remote: SocketAddr,
    pub peer: PeerIdentity,
    /// The peer as every audit record of this connection names it, built once.
    pub audit_peer: Arc<crate::audit::Peer>,
}

/// The request pipeline's shared state.
#[derive(Debug)]
pub struct Proxy {
    /// Methods allowed by check 2 (a handful: a scan beats hashing).
    methods: Vec<Method>,
    /// The `Allow` header sent with 405, built once.
    allow: HeaderValue,
    /// The policy snapshot, swapped whole on reload; a request reads it once, lock-free, and is decided by it.
    policy: ArcSwap<Policy>,
    /// Check 10; `None` when `jwt.mode = "off"`.
    jwt: Option<(Mode, Validator)>,
    upstream: Upstream,
    /// Check 11, and the header limits checked before everything else.
    limits: Arc<Limits>,
    /// Check 12 and the response records.
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
}

/// Why a request was not forwarded, or failed upstream before a response.
#[derive(Debug)]
pub enum Refusal {
    /// Before check 2: more header bytes or fields than `limits.max_header_bytes` / `max_header_count`.
    HeadersTooLarge,
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
}

impl Refusal {
    /// A bounded label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::HeadersTooLarge => "request_header_fields_too_large",
            Refusal::Method => "method_not_allowed",
            Refusal::Target(_) => "invalid_target_url",
            Refusal::Header(_) => "missing_or_invalid_header",
            Refusal::Denied(d) => d.reason(),
            Refusal::Jwt(..) => "invalid_jwt",
            Refusal::Throttled(t, _) => t.reason(),
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::Upstream { error, .. } => match error {
                ForwardError::Unreachable(_) => "error_communicating_to_endpoint",
                ForwardError::Timeout => "timeout_communicating_to_endpoint",
            },
        }
    }

    /// Status, issue code, severity and text, exactly as DESIGN.md 1.4 lists them.
    fn parts(&self) -> (StatusCode, IssueCode, Severity, String) {
        use IssueCode::*;
        match self {
            Refusal::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                TooLong,
                Severity::Error,
                "REQUEST_HEADER_FIELDS_TOO_LARGE".into(),
            ),
            Refusal::Throttled(Throttle::ConsumerRate { .. }, from) => (
                StatusCode::TOO_MANY_REQUESTS,
                Throttled,
                Severity::Error,
                format!("RATE_LIMIT_EXCEEDED_MESSAGESENDER_{from}"),
            ),
            Refusal::Throttled(Throttle::ConsumerConcurrency { .. }, from) => (
                StatusCode::TOO_MANY_REQUESTS,
                Throttled,
                Severity::Error,
                format!("CONCURRENCY_LIMIT_EXCEEDED_MESSAGESENDER_{from}"),
            ),
            Refusal::Throttled(Throttle::ProviderConcurrency { .. }, to) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Throttled,
                Severity::Error,
                format!("PROVIDER_CONCURRENCY_LIMIT_EXCEEDED_MESSAGERECEIVER_{to}"),
            ),
            Refusal::Method => (
                StatusCode::METHOD_NOT_ALLOWED,
                Forbidden,
                Severity::Fatal,
                "405: Method Not Allowed".into(),
            ),
            Refusal::Target(_) => (
                StatusCode::BAD_REQUEST,
                Invalid,
                Severity::Error,
                "INVALID_TARGET_URL".into(),
            ),
            Refusal::Header(HeaderError(name)) => (
                StatusCode::BAD_REQUEST,
                Invalid,
                Severity::Error,
                format!("MISSING_OR_INVALID_HEADER_{name}"),
            ),
            Refusal::Denied(d @ Denial::TargetVaries { .. }) => {
                (StatusCode::BAD_REQUEST, Invalid, Severity::Error, d.text())
            }
            Refusal::Denied(d) => (StatusCode::FORBIDDEN, Forbidden, Severity::Error, d.text()),
            Refusal::AuditUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                Transient,
                Severity::Error,
                "AUDIT_UNAVAILABLE".into(),
            ),
            Refusal::Jwt(v, _) => (
                StatusCode::BAD_REQUEST,
                Invalid,
                Severity::Error,
                format!("INVALID_JWT_{}", v.name()),
            ),
            Refusal::Upstream {
                error: ForwardError::Unreachable(_),
                target,
            } => (
                StatusCode::BAD_GATEWAY,
                Transient,
                Severity::Error,
                format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
            ),
            Refusal::Upstream {
                error: ForwardError::Timeout,
                target,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                Transient,
                Severity::Error,
                format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
            ),
        }
    }

    /// The consumer-facing response: an OperationOutcome in the negotiated format, `Cache-Control: no-store`, and
    /// the request's `Ssp-TraceID` echoed when it had one.
    pub fn respond(
        &self,
        format: Format,
        trace_id: Option<HeaderValue>,
        allow: &HeaderValue,
    ) -> (Response<ProxyBody>, String) {
        let (status, code, severity, text) = self.parts();
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

impl Proxy {
    pub fn new(
        methods: Vec<Method>,
        policy: Arc<Policy>,
        jwt: &JwtConfig,
        upstream: Upstream,
        limits: Arc<Limits>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let allow = methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            allow: HeaderValue::from_str(&allow)
                .unwrap_or_else(|_| HeaderValue::from_static("GET")),
            methods,
            policy: ArcSwap::new(policy),
            jwt: (jwt.mode != Mode::Off).then_some((
                jwt.mode,
                Validator {
                    profile: jwt.profile,
                    max_future_skew: jwt.max_future_skew,
                },
            )),
            upstream,
            limits,
            audit,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts a new policy generation in force for every request that starts from now on.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Handles one consumer request. Never fails: every error becomes a response here, and every request leaves
    /// audit records (a refused one: a `request` record with the decision and a `response` record).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        // Hop-by-hop fields go first (RFC 9110 7.6.1), so that the checks and the audit record see exactly the
        // header fields the provider will get: a field the consumer names in `Connection` is not forwarded, so it
        // is not checked either.
        crate::forward::normalize_request_headers(&mut parts.headers, parts.version);
        // Only a refusal needs the answer's format; keep the header (a refcount) and negotiate then.
        let accept = parts.headers.get(header::ACCEPT).cloned();
        let trace_id = parts.headers.get(ssp::HEADER_TRACE_ID).cloned();
        // For the log line of a refusal or upstream failure (cheap: the values share the request's buffer).
        let asids = (
            parts.headers.get(ssp::HEADER_FROM).cloned(),
            parts.headers.get(ssp::HEADER_TO).cloned(),
        );
        // One snapshot decides the whole request, and is the generation its records name.
        let policy = self.policy.load_full();
        let refusal = match self.check(&policy, &parts, conn) {
            Err(refusal) => refusal,
            Ok((permit, jwt, admission)) => {
                // 12: the request record is written (per `audit.durability`) before anything is forwarded.
                let tx = transaction(&permit, &parts, conn);
                match self.audit.write(Record::permitted(&tx, jwt)).await {
                    Err(_) => Refusal::AuditUnavailable,
                    Ok(()) => match self
                        .forward(
                            permit,
                            tx,
                            admission,
                            Request::from_parts(parts, body),
                            conn,
                            started,
                        )
                        .await
                    {
                        Ok(response) => return Ok(response),
                        Err(refusal) => {
                            log_refusal(&refusal, conn, trace_id.as_ref(), &asids);
                            return Ok(refusal
                                .respond(Format::negotiate(accept.as_ref()), trace_id, &self.allow)
                                .0);
                        }
                    },
                }
            }
        };
        log_refusal(&refusal, conn, trace_id.as_ref(), &asids);
        let (mut response, text) =
            refusal.respond(Format::negotiate(accept.as_ref()), trace_id, &self.allow);
        // An HTTP/1.1 connection can carry the consumer's next request only once this one's body has been read:
        // a small body is read and discarded. Past the bound hyper closes the connection after the answer, and
        // the answer says so, so that the client does not send its next request into a closing connection.
        // A request head over the limits says nothing good of what follows on its connection: it is closed.
        if parts.version <= http::Version::HTTP_11
            && (matches!(refusal, Refusal::HeadersTooLarge) || !drain(body).await)
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let interaction = parts
            .headers
            .get(ssp::HEADER_INTERACTION_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|i| policy.knows(i))
            .unwrap_or(OTHER);
        self.metrics.denied(refusal.reason());
        self.metrics.request_done(
            interaction,
            "denied",
            response.status().as_u16(),
            started.elapsed(),
        );
        if !matches!(refusal, Refusal::AuditUnavailable) {
            self.audit_refusal(
                &parts,
                conn,
                refusal,
                (response.status(), text),
                started,
                policy.generation,
            );
        }
        Ok(response)
    }

    /// The header limits, then checks 2 to 11, in order; the first failure wins.
    fn check(
        &self,
        policy: &Policy,
        parts: &http::request::Parts,
        conn: &ConnInfo,
    ) -> Result<(Permit, Option<JwtAudit>, Admission), Refusal> {
        // Size first: nothing else reads a request that is too large to be one.
        let limits = self.limits.config();
        if parts.headers.len() > limits.max_header_count
            || header_bytes(&parts.headers) > limits.max_header_bytes
        {
            return Err(Refusal::HeadersTooLarge);
        }
        // 2: method.
        if !self.methods.contains(&parts.method) {
            return Err(Refusal::Method);
        }
        // 3: target URL.
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let target = Target::from_request_path(path).map_err(Refusal::Target)?;
        // 4: Ssp-* headers.
        let headers = SspHeaders::parse(&parts.headers).map_err(Refusal::Header)?;
        // 5 to 9: directory and agreements.
        let permit = match policy.check(
            SspRequest { target, headers },
            &conn.peer,
            SystemTime::now(),
        ) {
            Decision::Permit(permit) => permit,
            Decision::Deny(denial) => return Err(Refusal::Denied(denial)),
        };
        // 10: the audit token.
        let jwt = self.check_jwt(&parts.headers, &permit, conn)?;
        // 11: limits, counted from here until the exchange ends.
        let h = &permit.request().headers;
        let admission = self
            .limits
            .admit(&h.from, &h.to, std::time::Instant::now())
            .map_err(|t| {
                let named = match t {
                    Throttle::ProviderConcurrency { .. } => h.to.clone(),
                    _ => h.from.clone(),
                };
                Refusal::Throttled(t, named)
            })?;
        Ok((permit, jwt, admission))
    }

    /// Forwards a permitted request, streaming both ways. The response record is written when the exchange ends.
    async fn forward(
        &self,
        permit: Permit,
        tx: Arc<Transaction>,
        admission: Admission,
        request: Request<Incoming>,
        conn: &ConnInfo,
        started: Instant,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let exchange = self.exchange(tx, admission, started);
        let response = match self
            .upstream
            .send(&permit, request, conn.remote, &exchange)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                let (status, outcome) = match error {
                    ForwardError::Timeout => (504, Outcome::Timeout),
                    ForwardError::Unreachable(_) => (502, Outcome::UpstreamError),
                };
                exchange.responded(status);
                exchange.finish(outcome);
                return Err(Refusal::Upstream {
                    error,
                    target: permit.target().as_str().to_owned(),
                });
            }
        };
        exchange.responded(response.status().as_u16());
        let (parts, body) = response.into_parts();
        let body = Streamed::new(
            body,
            self.upstream.body_idle_timeout(),
            exchange,
            Direction::Response,
        );
        Ok(Response::from_parts(parts, ProxyBody::stream(body)))
    }

    /// The exchange accounting of a forwarded request; when it ends it writes the response record and one
    /// operational log line.
    fn exchange(
        &self,
        tx: Arc<Transaction>,
        admission: Admission,
        started: Instant,
    ) -> Arc<Exchange> {
        let audit = Arc::clone(&self.audit);
        let metrics = Arc::clone(&self.metrics);
        Exchange::new(started, move |s| {
            // The exchange is over: its consumer and provider limits are free again.
            drop(admission);
            let [from, to, interaction] = tx.parties().map(|p| p.unwrap_or(OTHER));
            // A permitted interaction is one the policy names, so it is a bounded label.
            metrics.request_done(interaction, s.outcome.as_str(), s.status, s.total);
            metrics.upstream(s.upstream, s.bytes_in, s.bytes_out);
            match s.outcome {
                Outcome::UpstreamError => metrics.upstream_error("upstream_error"),
                Outcome::Timeout => metrics.upstream_error("timeout"),
                _ => {}
            }
            // A completed exchange is a debug line: the audit trail is its record, and a line per request at
            // national volumes would be rate-limited by the journal anyway. One that failed is an event.
            macro_rules! exchange_line {
                ($level:ident) => {
                    tracing::$level!(
                        conn = tx.conn_id,
                        trace_id = tx.trace_id().unwrap_or("-"),
                        from,
                        to,
                        interaction,
                        status = s.status,
                        bytes_in = s.bytes_in,
                        bytes_out = s.bytes_out,
                        upstream_ms = crate::audit::millis(s.upstream),
                        total_ms = crate::audit::millis(s.total),
                        outcome = s.outcome.as_str(),
                        retried = s.retried,
                        "exchange"
                    )
                };
            }
            if s.outcome == Outcome::Ok {
                exchange_line!(debug);
            } else {
                exchange_line!(info);
            }
            audit.submit(Record::completed(
                &tx,
                Completion {
                    status: s.status,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    upstream: s.upstream,
                    total: s.total,
                    retried: s.retried,
                    outcome: s.outcome,
                },
            ));
        })
    }

    /// The `request` and `response` records of a refused request, from the raw (bounded) values it carried.
    fn audit_refusal(
        &self,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        refusal: Refusal,
        (status, text): (StatusCode, String),
        started: Instant,
        generation: u64,
    ) {
        let raw = |name: &http::HeaderName| {
            parts.headers.get(name).map(|v| {
                let bytes = v.as_bytes();
                Box::from(String::from_utf8_lossy(
                    &bytes[..bytes.len().min(MAX_AUDITED_HEADER)],
                ))
            })
        };
        let target = parts.uri.path_and_query().map(|pq| {
            let text = pq.as_str().strip_prefix('/').unwrap_or(pq.as_str());
            let end = (0..=text.len().min(MAX_AUDITED_TARGET))
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            Box::from(&text[..end])
        });
        let tx = Arc::new(Transaction {
            conn_id: conn.id,
            peer: Arc::clone(&conn.audit_peer),
            method: parts.method.clone(),
            policy_generation: generation,
            names: Names::Raw {
                trace_id: raw(&ssp::HEADER_TRACE_ID),
                from: raw(&ssp::HEADER_FROM),
                to: raw(&ssp::HEADER_TO),
                interaction: raw(&ssp::HEADER_INTERACTION_ID),
                target,
            },
        });
        let jwt = match refusal {
            Refusal::Jwt(_, audit) => Some(audit),
            _ => None,
        };
        self.audit.submit(Record::refused(&tx, text, jwt));
        self.audit.submit(Record::completed(
            &tx,
            Completion {
                status: status.as_u16(),
                bytes_in: 0,
                bytes_out: 0,
                upstream: Duration::ZERO,
                total: started.elapsed(),
                retried: false,
                outcome: Outcome::Denied,
            },
        ));
    }

    /// Check 10: decodes and validates the token when `jwt.mode` is not `off`. In enforce mode the first violation
    /// refuses the request; in audit mode violations are recorded and the request goes on.
    fn check_jwt(
        &self,
        headers: &http::HeaderMap,
        permit: &Permit,
        conn: &ConnInfo,
    ) -> Result<Option<JwtAudit>, Refusal> {
        let Some((mode, validator)) = &self.jwt else {
            return Ok(None);
        };
        let now = crate::ids::unix_now();
        let expect = Expect {
            endpoint_url: &permit.endpoint().url,
            interaction: &permit.request().headers.interaction,
            now,
            keys: permit.jwt_keys(),
        };
        let audit = validator.check(
            headers
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
            &expect,
        );
        if let Some(violation) = audit.first_violation() {
            if *mode == Mode::Enforce {
                return Err(Refusal::Jwt(violation, Box::new(audit)));
            }
            // Violation names only: never the token or its claims.
            tracing::info!(
                conn = conn.id,
                trace_id = %permit.request().headers.trace_id,
                violations = ?audit.violations(),
                "audit token invalid; forwarded (jwt.mode = audit)"
            );
        }
        Ok(Some(audit))
    }
}

/// The transaction of a permitted request: its identifiers shared from the parse, not copied.
fn transaction(permit: &Permit, parts: &http::request::Parts, conn: &ConnInfo) -> Arc<Transaction> {
    let h = &permit.request().headers;
    Arc::new(Transaction {
        conn_id: conn.id,
        peer: Arc::clone(&conn.audit_peer),
        method: parts.method.clone(),
        policy_generation: permit.generation(),
        names: Names::Checked {
            trace_id: h.trace_id.clone(),
            from: h.from.clone(),
            to: h.to.clone(),
            interaction: h.interaction.clone(),
            target: Arc::clone(permit.target().shared_text()),
            fqdn: Arc::clone(permit.fqdn()),
        },
    })
}

/// Largest refused request body read and discarded to keep its connection open.
const MAX_DRAIN_BYTES: u64 = 64 * 1024;
/// Longest a refusal waits for that body.
const MAX_DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads and discards a refused request's body; true when it ended within the bounds.
async fn drain(mut body: Incoming) -> bool {
    use http_body_util::BodyExt;
    if body.is_end_stream() {
        return true;
    }
    if body.size_hint().lower() > MAX_DRAIN_BYTES {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > MAX_DRAIN_BYTES {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(MAX_DRAIN_TIME, read)
        .await
        .unwrap_or(false)
}

/// Bytes of header names and values, as `limits.max_header_bytes` counts them.
fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// Longest raw `Ssp-*` header value kept in a refusal's audit record.
const MAX_AUDITED_HEADER: usize = 256;
/// Longest raw target kept in a refusal's audit record.
const MAX_AUDITED_TARGET: usize = 8 * 1024;

/// One operational log line per refusal: trace id, ASIDs and a bounded reason. Never the target URL (it can
/// carry patient identifiers), never a token.
fn log_refusal(
    refusal: &Refusal,
    conn: &ConnInfo,
    trace_id: Option<&HeaderValue>,
    (from, to): &(Option<HeaderValue>, Option<HeaderValue>),
) {
    // Consumer input, so bounded; `to_str` admits visible ASCII only, so nothing can forge a log line.
    fn field(v: Option<&HeaderValue>) -> &str {
        v.and_then(|v| v.to_str().ok())
            .map_or("-", |t| &t[..t.len().min(64)])
    }
    let (trace_id, from, to) = (field(trace_id), field(from.as_ref()), field(to.as_ref()));
    match refusal {
        Refusal::Upstream { error, .. } => tracing::warn!(
            conn = conn.id,
            trace_id,
            from,
            to,
            reason = refusal.reason(),
            error = %error,
            "upstream failure"
        ),
        Refusal::Denied(d) => tracing::info!(
            conn = conn.id,
            trace_id,
            from,
            to,
            reason = refusal.reason(),
            check = d.check(),
            "request refused"
        ),
        _ => tracing::info!(
            conn = conn.id,
            trace_id,
            from,
            to,
            reason = refusal.reason(),
            "request refused"
        ),
    }
}

pin_project_lite::pin_project! {
    /// A consumer-facing response body: a refusal built here, or the provider's body streamed through.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Full { data: Option<Bytes> },
        Stream { #[pin] body: Streamed<Incoming> },
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyBody::Full { data } => f
                .debug_struct("Full")
                .field("len", &data.as_ref().map(Bytes::len))
                .finish(),
            ProxyBody::Stream { body } => body.fmt(f),
        }
    }
}

impl ProxyBody {
    pub fn full(data: Bytes) -> Self {
        ProxyBody::Full { data: Some(data) }
    }

    pub fn stream(body: Streamed<Incoming>) -> Self {
        ProxyBody::Stream { body }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBodyProj::Stream { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full { data } => data.is_none(),
            ProxyBody::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Stream { body } => body.size_hint(),
        }
    }
}
