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
use crate::audit::{PatientAccess, Record, Transaction};
use crate::forward::RequestFramingError;
use crate::limits::Admission;
use crate::metrics::OTHER;
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
            parts
                .headers
                .get(X_REQUEST_ID)
                .filter(|v| crate::ids::TraceId::from_field(v).is_some())
                .cloned(),
            parts
                .headers
                .get(X_CORRELATION_ID)
                .filter(|v| correlation_ok(v.as_bytes()))
                .cloned(),
        ];
        let head = parts.method == http::Method::HEAD;
        let policy = self.policy.load_full();
        let mut access = PatientAccess::default();
        let checked = self
            .patient_checks(front, &policy, &mut parts, framing, conn, &mut access)
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
        tracing::info!(
            conn = conn.id,
            reason = refusal.reason(),
            status = refusal.status().as_u16(),
            "patient-facing request refused"
        );
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
        self.metrics.denied(refusal.reason());
        self.metrics.request_done(
            OTHER,
            "denied",
            response.status().as_u16(),
            started.elapsed(),
        );
        if !matches!(refusal, PatientRefusal::AuditUnavailable) {
            let tx = Transaction::refused_patient_facing(
                conn.id,
                &conn.audit_peer,
                &parts,
                policy.generation,
                &front.config().asid,
                access,
                self.patients.as_ref(),
            );
            let status = refusal.status().as_u16();
            self.audit
                .submit(Record::refused(&tx, refusal.audit_text(), None));
            self.audit
                .submit(Record::denied(&tx, status, started.elapsed()));
        }
        Ok(response)
    }

    /// The checks of a patient-facing request, in order; the first failure wins. Fills `access` as it learns.
    async fn patient_checks(
        &self,
        front: &Front,
        policy: &Policy,
        parts: &mut http::request::Parts,
        framing: Result<(), RequestFramingError>,
        conn: &ConnInfo,
        access: &mut PatientAccess,
    ) -> Result<Checked, PatientRefusal> {
        Checks::header_limits(&parts.headers, self.limits.config())
            .map_err(|_| PatientRefusal::HeadersTooLarge)?;
        framing.map_err(PatientRefusal::Framing)?;
        let request_id = correlation(&parts.headers, &X_REQUEST_ID);
        access.request_id = request_id.as_ref().map(|(text, _)| text.clone());
        let correlation_id = correlation(&parts.headers, &X_CORRELATION_ID);
        access.correlation_id = correlation_id.as_ref().map(|(text, _)| text.clone());
        let trace_id = request_id
            .and_then(|(_, value)| crate::ids::TraceId::from_field(&value))
            .ok_or(PatientRefusal::RequestId)?;
        if correlation_id.is_some_and(|(text, _)| !correlation_ok(text.as_bytes())) {
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
        let token = front.supplier_token(supplier, subject_token).await;
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
    let compact: String = decoded.chars().filter(|c| *c != ' ').collect();
    compact
        .split(|c: char| !c.is_ascii_digit())
        .any(|run| run.len() == 10 && run != own && Check::of(run) == Check::Valid)
}

/// The query has an `access_token` parameter (its name percent-decoded).
fn names_access_token(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        percent_encoding::percent_decode_str(name)
            .decode_utf8_lossy()
            .eq_ignore_ascii_case("access_token")
    })
}

/// An `X-Correlation-ID` the door takes: 1 to 256 visible ASCII characters.
fn correlation_ok(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= MAX_CORRELATION_ID && value.iter().all(u8::is_ascii_graphic)
}

/// A correlation field's text when it is there once and is text (bounded for the record), and the value.
fn correlation(headers: &http::HeaderMap, name: &HeaderName) -> Option<(String, HeaderValue)> {
    let mut all = headers.get_all(name).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return Some((String::new(), HeaderValue::from_static("")));
    }
    let bytes = value.as_bytes();
    let text =
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_CORRELATION_ID + 1)]).into_owned();
    Some((text, value.clone()))
}

/// The header fields the provider gets: the app's token and any `Ssp-*` field it sent go; the checked request's
/// four `Ssp-*` fields and the supplier's token come in.
fn provider_headers(headers: &mut http::HeaderMap, permit: &Permit, supplier: &SupplierToken) {
    headers.remove(header::AUTHORIZATION);
    let sent: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("ssp-"))
        .cloned()
        .collect();
    for name in sent {
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
