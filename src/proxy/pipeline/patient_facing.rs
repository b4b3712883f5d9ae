//! The steps of one patient-facing request (`[patient_facing]`), in order: the header limits and framing,
//! `X-Request-ID` and `X-Correlation-ID`, the access token, the route, the app's rate, the patient's practice and
//! its endpoint, checks 5 to 9 on the request as the front's `[[system]]` sends it, check 11, the supplier's token,
//! then the request record (check 12) and forwarding, as on the clinical door and into the same chain. A refusal
//! is an R4 OperationOutcome (`proxy::patient_refusal`) with its two records.
//!
//! What goes to the provider is what was checked and recorded: the path under the practice's registered
//! endpoint, the app's header fields without its `Authorization` (the patient's token never reaches the
//! provider) and without any `Ssp-*` field it sent, plus the four `Ssp-*` fields of the checked request and the
//! supplier's token. The supplier's token is not in the record and never reaches the app.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::Proxy;
use super::ending::AbandonedExchange;
use crate::audit::{PatientAccess, Record, Transaction};
use crate::forward::RequestFramingError;
use crate::limits::Admission;
use crate::patient_facing::{Front, SupplierToken};
use crate::policy::{Decision, Permit, Policy};
use crate::proxy::ConnInfo;
use crate::proxy::body::{ProxyBody, drain};
use crate::proxy::checks::Checks;
use crate::proxy::patient_refusal::PatientRefusal;
use crate::ssp::{self, SspHeaders, SspRequest, Target};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// Longest `X-Correlation-ID` accepted.
const MAX_CORRELATION_ID: usize = 256;

/// What the checks hand to forwarding.
struct Checked {
    permit: Permit,
    admission: Admission,
    supplier: SupplierToken,
}

impl Proxy {
    /// Handles one request of the patient-facing listener. Never fails: every error becomes an R4
    /// OperationOutcome here, and every request leaves its records (as on the clinical door).
    pub(crate) async fn handle_patient_facing(
        &self,
        front: &Arc<Front>,
        request: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let (mut parts, body) = request.into_parts();
        let framing = crate::forward::request_framing(&parts.headers, parts.version);
        crate::forward::normalize_request_headers(&mut parts.headers, parts.version);
        // Echoed when well formed: a refused value is not sent back.
        let echo = [
            once(&parts.headers, &X_REQUEST_ID)
                .ok()
                .flatten()
                .filter(|v| crate::ids::TraceId::from_field(v).is_some())
                .cloned(),
            once(&parts.headers, &X_CORRELATION_ID)
                .ok()
                .flatten()
                .filter(|v| correlation_ok(v.as_bytes()))
                .cloned(),
        ];
        let head = parts.method == http::Method::HEAD;
        let policy = self.policy.load_full();
        let mut access = PatientAccess::default();
        let checked = self
            .patient_checks(
                front,
                started,
                &policy,
                &mut parts,
                framing,
                conn,
                &mut access,
            )
            .await;
        let refusal = 'refused: {
            let Checked {
                permit,
                admission,
                supplier,
            } = match checked {
                Ok(checked) => checked,
                Err(refusal) => break 'refused refusal,
            };
            let tx = Transaction::patient_facing(
                conn.id,
                &conn.audit_peer,
                &parts.method,
                &permit,
                std::mem::take(&mut access),
                self.patients.as_ref(),
            );
            // 12: the request record is written before anything is forwarded.
            let record = Record::permitted(&tx, None);
            let Some(exchange) = self
                .open_exchange(&tx, record, admission, started, conn)
                .await
            else {
                break 'refused PatientRefusal::AuditUnavailable;
            };
            provider_headers(&mut parts.headers, &permit, &supplier);
            let mut response = match self
                .forward(&permit, exchange, Request::from_parts(parts, body), conn)
                .await
            {
                Ok(response) => response,
                Err(refusal) => {
                    let refusal = match refusal {
                        super::Refusal::Upstream { error, .. } => PatientRefusal::Upstream(error),
                        _ => PatientRefusal::MalformedBody,
                    };
                    tracing::info!(
                        conn = conn.id,
                        reason = refusal.reason(),
                        "patient-facing request failed after its record"
                    );
                    let mut response = refusal.respond();
                    super::head_has_no_body(head, &mut response);
                    if matches!(refusal, PatientRefusal::MalformedBody) {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    response
                }
            };
            echo_ids(&mut response, echo);
            return Ok(response);
        };
        let mut response = refusal.respond();
        super::head_has_no_body(head, &mut response);
        if parts.version <= http::Version::HTTP_11
            && (matches!(refusal, PatientRefusal::HeadersTooLarge) || !drain(body).await)
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        echo_ids(&mut response, echo);
        self.end_patient_refused(
            &parts,
            conn,
            &refusal,
            response.status().as_u16(),
            &front.config().asid,
            access,
            started,
            policy.generation,
        );
        Ok(response)
    }

    /// The checks of a patient-facing request, in order; the first failure wins. Fills `access` as it learns.
    #[allow(
        clippy::too_many_arguments,
        reason = "the request's parts, each used by a check"
    )]
    async fn patient_checks(
        &self,
        front: &Arc<Front>,
        started: Instant,
        policy: &Policy,
        parts: &mut http::request::Parts,
        framing: Result<(), RequestFramingError>,
        conn: &ConnInfo,
        access: &mut PatientAccess,
    ) -> Result<Checked, PatientRefusal> {
        Checks::header_limits(&parts.headers, self.limits.config())
            .map_err(|_| PatientRefusal::HeadersTooLarge)?;
        framing.map_err(PatientRefusal::Framing)?;
        let request_id = once(&parts.headers, &X_REQUEST_ID);
        let correlation_id = once(&parts.headers, &X_CORRELATION_ID);
        access.request_id = request_id.ok().flatten().map(recorded);
        access.correlation_id = correlation_id.ok().flatten().map(recorded);
        let trace_id = request_id
            .ok()
            .flatten()
            .and_then(crate::ids::TraceId::from_field)
            .ok_or(PatientRefusal::RequestId)?;
        if !correlation_id.is_ok_and(|v| v.is_none_or(|v| correlation_ok(v.as_bytes()))) {
            return Err(PatientRefusal::CorrelationId);
        }
        if parts.uri.query().is_some_and(names_access_token) {
            return Err(PatientRefusal::TokenInQuery);
        }
        let (token, subject_token) = front
            .verify(&parts.headers, access)
            .await
            .map_err(PatientRefusal::Token)?;
        let route = front
            .route(&parts.method, parts.uri.path())
            .map_err(PatientRefusal::Route)?;
        // A patient's token reaches their own record only: the path and query may name no one else. (A body is
        // streamed, not read here: the supplier's token, exchanged for this patient, is what scopes it.)
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        if names_other_patient(path, &token.nhs_number) {
            return Err(PatientRefusal::OtherPatient);
        }
        front
            .admit_app(&token.client_id)
            .map_err(PatientRefusal::App)?;
        let (practice, found_in) = front
            .practice(&token)
            .ok_or(PatientRefusal::PracticeNotFound)?;
        access.practice = Some((practice.as_str().to_owned(), found_in));
        if !policy.has_practice(&practice) {
            return Err(PatientRefusal::PracticeNotFound);
        }
        let endpoint = policy
            .practice_endpoint(&practice, &route.interaction)
            .ok_or(PatientRefusal::NotAtPractice)?;
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let target =
            Target::parse(&format!("{}{path}", endpoint.url)).map_err(PatientRefusal::Path)?;
        let request = SspRequest {
            target,
            headers: SspHeaders {
                trace_id,
                from: front.config().asid.clone(),
                to: endpoint.asid.clone(),
                interaction: route.interaction.clone(),
            },
        };
        let platform = conn.certified.then_some(&conn.peer);
        let permit = match policy.decide_patient_facing(request, platform, SystemTime::now()) {
            Decision::Permit(permit) => permit,
            Decision::Deny(denial) => return Err(PatientRefusal::Denied(denial)),
        };
        let headers = &permit.request().headers;
        let admission = self
            .limits
            .admit(&headers.from, &headers.to, Instant::now())
            .map_err(PatientRefusal::Throttled)?;
        let supplier = permit
            .endpoint()
            .org
            .supplier
            .as_deref()
            .and_then(|name| policy.supplier(name))
            .ok_or(PatientRefusal::SupplierNotConfigured)?;
        access.supplier = Some(supplier.name.clone());
        let token = match front.cached_supplier_token(supplier, subject_token) {
            Some(answer) => answer,
            None => {
                // The token endpoint is called now: a consumer that goes away meanwhile still leaves its records.
                let watch = AbandonedExchange {
                    proxy: self,
                    tx: Some(Transaction::refused_patient_facing(
                        conn.id,
                        &conn.audit_peer,
                        parts,
                        policy.generation,
                        &front.config().asid,
                        access.clone(),
                        self.patients.as_ref(),
                    )),
                    started,
                };
                let answer = front.exchange_supplier_token(supplier, subject_token).await;
                watch.disarm();
                answer
            }
        };
        let outcome = match &token {
            Ok(t) => t.outcome,
            Err(e) => e.outcome,
        };
        access.exchange = Some(outcome.as_str());
        self.metrics.token_exchange(outcome.as_str());
        let supplier = token.map_err(|e| {
            tracing::warn!(supplier = %supplier.name, detail = %e.detail, "supplier token exchange failed");
            PatientRefusal::Exchange(e)
        })?;
        Ok(Checked {
            permit,
            admission,
            supplier,
        })
    }
}

/// `path` (a path and query) names an NHS number other than `own`: one the patient index reads there (an
/// identifier's value, a `Patient/` segment), or any run of exactly ten digits with a valid check digit in the
/// percent-decoded text with its spaces taken out (`?subject=Patient/943 476 5919`, `?nhs_number=...`), which a
/// provider might read as one. A ten-digit logical id that happens to pass the check is refused too: the door's
/// routes name the patient by their token, not by id.
fn names_other_patient(path: &str, own: &str) -> bool {
    use crate::audit::patients::{Check, Indexer};
    if Indexer::numbers_in(path).iter().any(|n| n != own) {
        return true;
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    // `+` is a space in a query (the form encoding), as a tab may be to a lenient reader.
    let compact: String = decoded
        .chars()
        .filter(|c| !matches!(c, ' ' | '+' | '\t'))
        .collect();
    compact
        .split(|c: char| !c.is_ascii_digit())
        .any(|run| run.len() == 10 && run != own && Check::of(run) == Check::Valid)
}

/// The query names `access_token` anywhere, in any case, percent-decoded (`a=1;access_token=x`, `access_token[]=x`
/// and `access_token+=x` too: query parsers differ on separators and names, so none is given the benefit).
fn names_access_token(query: &str) -> bool {
    percent_encoding::percent_decode_str(query)
        .decode_utf8_lossy()
        .to_ascii_lowercase()
        .contains("access_token")
}

/// An `X-Correlation-ID` the door takes: 1 to 256 visible ASCII characters.
fn correlation_ok(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_CORRELATION_ID && value.iter().all(u8::is_ascii_graphic)
}

/// A field's value when it is there at most once: `Err` when it is repeated (which of them is meant would be a
/// guess), `Ok(None)` when it is absent.
fn once<'h>(
    headers: &'h http::HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h HeaderValue>, ()> {
    let mut all = headers.get_all(name).iter();
    match (all.next(), all.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(()),
    }
}

/// A correlation field's value as the record keeps it: its text (lossy UTF-8), at most one byte past the longest
/// accepted, so that a refused value is recorded as refused without being kept whole.
fn recorded(value: &HeaderValue) -> String {
    let bytes = value.as_bytes();
    String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_CORRELATION_ID + 1)]).into_owned()
}

/// The header fields the provider gets: of the app's, only [`FORWARDED_FIELDS`] (so neither its token nor any
/// `Ssp-*` field it sent); the checked request's four `Ssp-*` fields and the supplier's token come in.
fn provider_headers(headers: &mut http::HeaderMap, permit: &Permit, supplier: &SupplierToken) {
    // An app is an internet client: only the end-to-end fields a FHIR request needs go on. Fields a provider's
    // stack might act on (`X-Original-URL`, `X-HTTP-Method-Override`, `X-Forwarded-*`, `Forwarded`, an NHS number
    // field of a gateway convention) would get around the route, the method and the patient checks.
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !FORWARDED_FIELDS.contains(&name.as_str()))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
    let checked = &permit.request().headers;
    let value = |text: &str| HeaderValue::from_str(text).ok();
    for (name, text) in [
        (ssp::HEADER_TRACE_ID, checked.trace_id.as_str()),
        (ssp::HEADER_FROM, checked.from.as_str()),
        (ssp::HEADER_TO, checked.to.as_str()),
        (ssp::HEADER_INTERACTION_ID, checked.interaction.as_str()),
    ] {
        if let Some(v) = value(text) {
            headers.insert(name, v);
        }
    }
    headers.insert(header::AUTHORIZATION, supplier.authorization.clone());
}

/// The app's header fields a provider gets (lower case, as `http` names them); the proxy then sets `Host`,
/// `Forwarded`, `X-Forwarded-For`, the four `Ssp-*` fields and `Authorization`.
const FORWARDED_FIELDS: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "content-encoding",
    "content-length",
    "content-type",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-unmodified-since",
    "prefer",
    "user-agent",
    "x-correlation-id",
    "x-request-id",
];

/// Echoes the request's `X-Request-ID` and `X-Correlation-ID` on its answer.
fn echo_ids(response: &mut Response<ProxyBody>, echo: [Option<HeaderValue>; 2]) {
    let [request_id, correlation_id] = echo;
    if let Some(v) = request_id {
        response.headers_mut().insert(X_REQUEST_ID, v);
    }
    if let Some(v) = correlation_id {
        response.headers_mut().insert(X_CORRELATION_ID, v);
    }
}
