//! What onboarding does in the running proxy ([`crate::proxy::Onboarding`]): `GET /_ssp/selftest[/<target URL>]`
//! on the consumer listener, when `server.selftest = true` (the verdict of checks 1 to 12 for the certificate the
//! consumer presented on this connection and the header fields it sent, as JSON; it forwards nothing, counts
//! against the consumer's own limits (over them, the 429 of check 11), and writes one `selftest` audit record), and
//! the credential radar's notes of permitted and refused requests.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use std::sync::Arc;

use super::radar::Radar;
use super::{CheckReport, Context, Refused, Sample, Status};
use crate::audit::{Record, Transaction};
use crate::metrics::Metrics;
use crate::policy::{Denial, Permit, Policy};
use crate::proxy::operation_outcome::Format;
use crate::proxy::{ConnInfo, Proxy, ProxyBody, Refusal};

/// The path the self-test answers on; the target URL to check may follow it after a `/`.
const PATH: &str = "/_ssp/selftest";

/// The request target after [`PATH`], when this is a self-test request: `""` (no target given) or the target URL.
fn target_of(path_and_query: &str) -> Option<&str> {
    let rest = path_and_query.strip_prefix(PATH)?;
    if rest.is_empty() || rest.starts_with('?') {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// The self-test (when on) and the credential radar, as the pipeline calls them.
#[derive(Debug)]
pub(crate) struct Live {
    /// `server.selftest`.
    pub selftest: bool,
    pub radar: Arc<Radar>,
    pub metrics: Arc<Metrics>,
}

impl crate::proxy::Onboarding for Live {
    fn selftest(
        &self,
        proxy: &Proxy,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        policy: &Policy,
    ) -> Option<Response<ProxyBody>> {
        if !self.selftest || parts.method != http::Method::GET {
            return None;
        }
        let target = target_of(parts.uri.path_and_query().map_or("/", |pq| pq.as_str()))?;
        Some(answer(proxy, parts, target, conn, policy))
    }

    /// Notes the connection's certificate for the sender its first permitted request named (again only for
    /// another sender).
    fn permitted(&self, conn: &ConnInfo, permit: &Permit) {
        let from = &permit.request().headers.from;
        if conn.noted.get() == Some(from) {
            return;
        }
        let _ = conn.noted.set(from.clone());
        self.radar.note(
            from,
            &conn.peer,
            permit.fqdn(),
            crate::clock::unix_now(),
            &self.metrics,
        );
    }

    fn refused(&self, conn: &ConnInfo, refusal: &Refusal, policy: &Policy) {
        if let Refusal::Denied(Denial::FqdnMismatch { from }) = refusal
            && let Some(system) = policy.system(from)
        {
            self.radar
                .fqdn_mismatch(from, &conn.peer, &system.fqdn, &self.metrics);
        }
    }
}

/// The self-test's answer: 200 with the verdict as JSON, or the refusal of check 11 when the consumer is over its
/// limits. Writes the `selftest` record.
fn answer(
    proxy: &Proxy,
    parts: &http::request::Parts,
    target: &str,
    conn: &ConnInfo,
    policy: &Policy,
) -> Response<ProxyBody> {
    let now = std::time::SystemTime::now();
    let unix = crate::clock::unix_seconds(now);
    let peer = &conn.peer;
    // Check 1 passed: this connection's handshake verified the certificate.
    let mut first = CheckReport::new(1, "certificate");
    first.status = Status::Pass;
    first.detail = format!(
        "the handshake verified {} (serial {}), valid until {} ({} days)",
        peer.subject,
        peer.serial,
        crate::clock::rfc3339_seconds(peer.not_after),
        (peer.not_after - unix).div_euclid(86_400)
    );
    if peer.not_after - unix < 30 * 86_400 {
        first.fixes.push("warning: the certificate expires within 30 days: have its renewal issued and registered now".into());
    }
    let names = peer.names();
    let sample = Sample {
        method: http::Method::GET,
        target: target.to_owned(),
        headers: parts.headers.clone(),
    };
    // 11: the consumer's own limits, counted like a request's (and released at once: nothing is forwarded).
    let fields = crate::ssp::SspFields::read(&parts.headers);
    let mut throttled = None;
    let eleven = match (&fields.from, &fields.to) {
        (Ok(from), Ok(to)) if policy.system(from).is_some() => {
            let to = if policy.endpoint(to).is_some() {
                to
            } else {
                from
            };
            match proxy.limits().admit(from, to, tokio::time::Instant::now()) {
                Ok(_admission) => {
                    CheckReport::pass(11, "limits", "within the consumer's limits".into())
                }
                Err(t) => {
                    let named = match t {
                        crate::limits::Throttle::ProviderConcurrency { .. } => to.clone(),
                        _ => from.clone(),
                    };
                    let refusal = Refusal::Throttled(t, named);
                    let report = CheckReport::refused(
                        11,
                        "limits",
                        &refusal,
                        "over the consumer's limits".into(),
                        "wait the X-Rate-Limit-Reset seconds; limits apply per proxy instance"
                            .into(),
                    );
                    throttled = Some(refusal);
                    report
                }
            }
        }
        _ => CheckReport::not_run(
            11,
            "limits",
            "needs a registered Ssp-From (checks 4 and 6)".into(),
        ),
    };
    // 12: the log takes records; this self-test's own goes to it.
    let twelve = if proxy.audit().healthy() {
        CheckReport::pass(
            12,
            "audit",
            "the audit log takes records (this self-test wrote its own)".into(),
        )
    } else {
        CheckReport::refused(
            12,
            "audit",
            &Refusal::AuditUnavailable,
            "the audit log is not taking records".into(),
            "the proxy's, not the consumer's: retry later".into(),
        )
    };
    let ctx = Context {
        checks: proxy.checks(),
        policy,
        limits: proxy.limits().config(),
        now,
    };
    let verdict = super::evaluate(&ctx, first, Some(&names), &sample, Some([eleven, twelve]));
    let reason = match verdict.first_refusal() {
        Some(Refused::Http { text, .. }) => Some(text.clone()),
        Some(Refused::Handshake(reason)) => Some((*reason).to_owned()),
        None => None,
    };
    // A reason can quote the target: redacted as the record's target is.
    let reason = match proxy.patients() {
        Some(indexer) => reason.map(|r| indexer.redact_text(r)),
        None => reason,
    };
    let tx = Transaction::refused(
        conn.id,
        &conn.audit_peer,
        parts,
        policy.generation,
        proxy.patients(),
    );
    proxy.audit().submit(Record::selftest(
        &tx,
        verdict.passed(),
        verdict.failed(),
        reason,
    ));
    let trace_id = parts.headers.get(crate::ssp::HEADER_TRACE_ID).cloned();
    if let Some(refusal) = throttled {
        let format = Format::negotiate(parts.headers.get(header::ACCEPT));
        return refusal.respond(format, trace_id, &proxy.checks().allow).0;
    }
    let body = super::verdict_json(&verdict).to_string();
    let mut response = Response::new(ProxyBody::full(body.into()));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(trace_id) = trace_id {
        headers.insert(crate::ssp::HEADER_TRACE_ID, trace_id);
    }
    response
}
