//! The order of the steps for one request (DESIGN.md 1.4, checks 2 to 12; 1 is the handshake in `server`):
//! hop-by-hop removal, the checks, the request record, forwarding, and the exchange that writes the response
//! record when both bodies end.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{ConsumerLeft, ProxyBody, drain};
use super::checks::Checks;
use super::operation_outcome::Format;
use super::refusal::Refusal;
use super::{ConnControl, ConnInfo};
use crate::audit::patients::Indexer;
use crate::audit::{AuditLog, Outcome, Record, Transaction};
use crate::config::JwtConfig;
use crate::forward::{
    Direction, ForwardError, ProviderBody, RequestFramingError, SharedExchange, Streamed, Upstream,
};
use crate::jwt::JwtAudit;
use crate::limits::{Admission, Limits, Throttle};
use crate::metrics::{Metrics, OTHER};
use crate::policy::{Decision, Permit, Policy};
use crate::ssp::{self, SspRequest};
use ending::log_refusal;

mod ending;
mod patient_facing;

use ending::Ending;

/// The request pipeline's shared state.
#[derive(Debug)]
pub struct Proxy {
    /// Checks 2, 3, 4 and 10.
    checks: Checks,
    /// The policy snapshot, swapped whole on reload; a request reads it once, lock-free, and is decided by it.
    policy: ArcSwap<Policy>,
    upstream: Upstream,
    /// Check 11, and the header limits checked before everything else.
    limits: Arc<Limits>,
    /// Check 12 and the response records.
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// The self-test and the credential radar.
    onboarding: Option<Arc<dyn super::Onboarding>>,
    /// `[audit.patients]`: the NHS numbers each request names, hashed into its records.
    patients: Option<Arc<Indexer>>,
    /// `[patient_facing]`: the patient-facing door's state.
    front: Option<Arc<crate::patient_facing::Front>>,
}

impl Proxy {
    pub(crate) fn new(
        methods: Vec<Method>,
        policy: Arc<Policy>,
        jwt: &JwtConfig,
        upstream: Upstream,
        limits: Arc<Limits>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            checks: Checks::new(methods, jwt),
            policy: ArcSwap::new(policy),
            upstream,
            limits,
            audit,
            metrics,
            onboarding: None,
            patients: None,
            front: None,
        }
    }

    /// Serves the patient-facing listener's requests with `front`.
    pub(crate) fn with_patient_facing(mut self, front: Arc<crate::patient_facing::Front>) -> Self {
        self.front = Some(front);
        self
    }

    /// Records the NHS numbers each request names, as `indexer` hashes (and redacts) them.
    pub(crate) fn with_patients(mut self, indexer: Arc<Indexer>) -> Self {
        self.patients = Some(indexer);
        self
    }

    /// The patient numbers' hasher, with `[audit.patients]`.
    pub(crate) fn patients(&self) -> Option<&Arc<Indexer>> {
        self.patients.as_ref()
    }

    /// Hands the self-test and the credential radar their part of each request.
    pub(crate) fn with_onboarding(mut self, onboarding: Arc<dyn super::Onboarding>) -> Self {
        self.onboarding = Some(onboarding);
        self
    }

    /// Checks 2, 3, 4 and 10.
    pub(crate) fn checks(&self) -> &Checks {
        &self.checks
    }

    /// Check 11.
    pub(crate) fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Check 12, and every record.
    pub(crate) fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts a new policy generation in force for every request that starts from now on.
    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    /// Handles one consumer request. Never fails: every error becomes a response here, and every request leaves
    /// audit records (a refused one: a `request` record with the decision and a `response` record), or, refused
    /// because the audit log cannot take them (503 `AUDIT_UNAVAILABLE`), none, or a complete pair (see
    /// `audit::writer::slot`).
    ///
    /// Its future has a size budget of 4 KiB, held by `proxy::tests::the_request_future_stays_under_4_kib`: hyper
    /// boxes one per request and moves it whole when first awaited. Keep across an `.await` only what a later step
    /// needs (take a checks' `Result` apart in its own statement rather than `match` on it), and pass large values
    /// such as the `Permit` by reference into awaited calls.
    pub(crate) async fn handle(
        &self,
        request: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if conn.door == super::Door::PatientFacing
            && let Some(front) = &self.front
        {
            return Box::pin(self.handle_patient_facing(front, request, conn)).await;
        }
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        // Read before the hop-by-hop removal takes `Transfer-Encoding` away; refused after the size check.
        let framing = crate::forward::request_framing(&parts.headers, parts.version);
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
        let head = parts.method == Method::HEAD;
        // One snapshot decides the whole request, and is the generation its records name.
        let policy = self.policy.load_full();
        if let Some(mut response) = self
            .onboarding
            .as_ref()
            .and_then(|o| o.selftest(self, &parts, conn, &policy))
        {
            if parts.version <= http::Version::HTTP_11 && !drain(body).await {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Ok(response);
        }
        let refusal = 'refused: {
            // Taken apart in its own statement: a `match` on the checks' result would keep the whole `Result`
            // (some 850 bytes) in this future across every await below, and in each future that holds this one.
            let (permit, jwt, admission) = match self.run_checks(&policy, &parts, framing, conn) {
                Ok(checked) => checked,
                Err(refusal) => break 'refused refusal,
            };
            if let Some(onboarding) = &self.onboarding {
                onboarding.permitted(conn, &permit);
            }
            // 12: the request record is written (per `audit.durability`) before anything is forwarded.
            let tx = Transaction::permitted(
                conn.id,
                &conn.audit_peer,
                &parts.method,
                &permit,
                self.patients.as_ref(),
            );
            let record = Record::permitted(&tx, jwt);
            let Some(exchange) = self
                .open_exchange(&tx, record, admission, started, conn)
                .await
            else {
                break 'refused Refusal::AuditUnavailable;
            };
            match self
                .forward(&permit, exchange, Request::from_parts(parts, body), conn)
                .await
            {
                Ok(response) => return Ok(response),
                Err(refusal) => {
                    log_refusal(&refusal, conn, trace_id.as_ref(), &asids);
                    let (mut response, _) = refusal.respond(
                        Format::negotiate(accept.as_ref()),
                        trace_id,
                        &self.checks.allow,
                    );
                    head_has_no_body(head, &mut response);
                    if matches!(refusal, Refusal::MalformedBody) {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    return Ok(response);
                }
            }
        };
        if let Some(onboarding) = &self.onboarding {
            onboarding.refused(conn, &refusal, &policy);
        }
        let (mut response, text) = refusal.respond(
            Format::negotiate(accept.as_ref()),
            trace_id,
            &self.checks.allow,
        );
        head_has_no_body(parts.method == Method::HEAD, &mut response);
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
        self.end_refused(
            &parts,
            conn,
            refusal,
            text,
            response.status().as_u16(),
            interaction,
            started,
            policy.generation,
        );
        Ok(response)
    }

    /// The header limits, then checks 2 to 11, in order; the first failure wins.
    fn run_checks(
        &self,
        policy: &Policy,
        parts: &http::request::Parts,
        framing: Result<(), RequestFramingError>,
        conn: &ConnInfo,
    ) -> Result<(Permit, Option<JwtAudit>, Admission), Refusal> {
        // Size first: nothing else reads a request that is too large to be one.
        Checks::header_limits(&parts.headers, self.limits.config())?;
        // The message's own framing (RFC 9112 sections 3.2 and 6.1), before anything reads what it carries.
        framing.map_err(Refusal::Framing)?;
        // 2: method.
        self.checks.method(&parts.method)?;
        // 3: target URL.
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let target = Checks::target(path)?;
        // 4: Ssp-* headers.
        let headers = Checks::headers(&parts.headers)?;
        // 5 to 9: directory and agreements.
        let permit = match policy.decide(
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
        let ssp_headers = &permit.request().headers;
        let admission = self
            .limits
            .admit(&ssp_headers.from, &ssp_headers.to, Instant::now())
            .map_err(|t| {
                let named = match t {
                    Throttle::ProviderConcurrency { .. } => ssp_headers.to.clone(),
                    _ => ssp_headers.from.clone(),
                };
                Refusal::Throttled(t, named)
            })?;
        Ok((permit, jwt, admission))
    }

    /// Forwards a permitted request, streaming both ways. The response record is written when the exchange ends.
    async fn forward(
        &self,
        permit: &Permit,
        exchange: Arc<Ending>,
        request: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let exchange: SharedExchange = exchange;
        let http2 = request.version() == http::Version::HTTP_2;
        let response = match self
            .upstream
            .send(permit, request, &conn.client, &exchange)
            .await
        {
            Ok(response) => response,
            // The consumer's body broke off: the consumer has gone (or reset its stream), which ended the exchange
            // `client_closed`, and the provider leg failed for that. Not the provider's failure, and no one is
            // there to answer: no status is recorded and no upstream failure logged, and the connection is closed
            // without an answer, as when a consumer hangs up while its request waits.
            Err(_) if exchange.consumer_left_mid_body() => return Ok(ConsumerLeft::response()),
            Err(ForwardError::MalformedRequestBody) => {
                // The consumer's fault, not the provider's: no upstream error is counted or logged, and the
                // connection closes after the answer (its framing is lost).
                let refusal = Refusal::MalformedBody;
                self.metrics.denied(refusal.reason());
                exchange.responded(refusal.status().as_u16());
                exchange.finish(Outcome::ClientError);
                return Err(refusal);
            }
            Err(error) => {
                let outcome = match error {
                    ForwardError::Timeout => Outcome::Timeout,
                    ForwardError::Unreachable(_)
                    | ForwardError::HeadTooLarge
                    | ForwardError::BadResponse(_)
                    | ForwardError::MalformedRequestBody => Outcome::UpstreamError,
                };
                let refusal = Refusal::Upstream {
                    error,
                    target: permit.target().as_str().to_owned(),
                };
                // The record names the status the consumer is answered with.
                exchange.responded(refusal.status().as_u16());
                exchange.finish(outcome);
                return Err(refusal);
            }
        };
        exchange.responded(response.status().as_u16());
        let (mut parts, body) = response.into_parts();
        // The consumer is answered in its own protocol (RFC 9110 section 6.2), not the provider's: an HTTP/1.1
        // consumer of an HTTP/1.0 provider gets HTTP/1.1, chunked where the length is unknown, so that a body cut
        // short is seen as cut. hyper lowers it again for an HTTP/1.0 consumer; HTTP/2 has no version line.
        parts.version = http::Version::HTTP_11;
        let bound = self.upstream.body_idle_timeout();
        if may_stall(&body, http2) {
            let watch = tokio::spawn(watch_consumer(
                Arc::downgrade(&exchange),
                bound,
                Arc::clone(&conn.control),
                Arc::clone(&self.metrics),
            ));
            exchange.set_watch(watch.abort_handle());
            conn.control.watch(&exchange);
        }
        let body = Streamed::new(body, bound, exchange, Direction::Response);
        Ok(Response::from_parts(parts, ProxyBody::stream(body)))
    }

    /// Check 10: decodes and validates the token when `jwt.mode` is not `off`. In enforce mode the first violation
    /// refuses the request; in audit mode violations are recorded and the request goes on.
    fn check_jwt(
        &self,
        headers: &http::HeaderMap,
        permit: &Permit,
        conn: &ConnInfo,
    ) -> Result<Option<JwtAudit>, Refusal> {
        let checked = self.checks.token(
            headers,
            &permit.endpoint().url,
            &permit.request().headers.interaction,
            permit.jwt_keys(),
            crate::clock::unix_now(),
        );
        let audit = checked.into_result()?;
        if let Some(audit) = &audit
            && !audit.found.is_empty()
        {
            // Violation names only: never the token or its claims.
            tracing::info!(
                conn = conn.id,
                trace_id = %permit.request().headers.trace_id,
                violations = ?audit.violations(),
                "audit token invalid; forwarded (jwt.mode = audit)"
            );
        }
        Ok(audit)
    }
}

/// A response to HEAD has the header fields a GET would get, `Content-Length` included, and no content (RFC 9110
/// section 9.3.2); HTTP/2 treats content on it as a protocol error.
fn head_has_no_body(head: bool, response: &mut Response<ProxyBody>) {
    if head {
        if let Some(len) = http_body::Body::size_hint(response.body()).exact() {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        *response.body_mut() = ProxyBody::empty();
    }
}

/// A provider body the consumer could stop taking part-way through while its exchange holds a provider
/// connection or the limits' slots. Over HTTP/2 any body can: a stream or connection window the consumer keeps
/// shut (even at zero from the start) stops the first frame. Over HTTP/1.x a body of known length that fits in
/// hyper's write buffer (16 KiB here, well under it) is taken whole whatever the consumer reads, and its exchange
/// ends with it; a longer one, or one of unknown length, can be held.
fn may_stall(body: &ProviderBody, http2: bool) -> bool {
    use http_body::Body;
    const FITS: u64 = 16 * 1024;
    !body.is_end_stream() && (http2 || body.size_hint().exact().is_none_or(|len| len > FITS))
}

/// Cuts the consumer's connection when the consumer takes no response bytes for `bound`
/// (`upstream.body_idle_timeout`, the counterpart of nginx's `send_timeout`): the exchange ends as `timeout`,
/// and every body on the connection is dropped, which closes and frees the provider connection. A wait for the
/// provider is not the consumer's: the response body's own idle timer bounds that. Ends with the exchange
/// (aborted by it) or when it cuts.
async fn watch_consumer(
    exchange: std::sync::Weak<dyn crate::forward::HoldsExchange>,
    bound: std::time::Duration,
    control: Arc<ConnControl>,
    metrics: Arc<Metrics>,
) {
    let mut deadline = Instant::now() + bound;
    loop {
        tokio::time::sleep_until(deadline).await;
        let Some(exchange) = exchange.upgrade() else {
            return;
        };
        let now = Instant::now();
        match exchange.consumer_waiting_since() {
            Some(since) if since + bound <= now => {
                exchange.consumer_stalled();
                drop(exchange);
                if control.cut_for_send_timeout() {
                    tracing::info!(
                        bound_s = bound.as_secs_f64(),
                        "consumer took no response bytes within upstream.body_idle_timeout; cutting its connection"
                    );
                    metrics.connection_cut("send_timeout");
                }
                return;
            }
            Some(since) => deadline = since + bound,
            None => deadline = now + bound,
        }
    }
}
