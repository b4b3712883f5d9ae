//! Onboarding: the verdict of checks 1 to 12 for a would-be consumer (`ssp onboard check`, and the live
//! `GET /_ssp/selftest` when `server.selftest = true`), and the credential radar (the consumer certificates seen
//! per registered ASID, their expiry gauge and `ssp certs report`).
//!
//! The verdict runs the proxy's own check functions (`tls::client_verifier`, `proxy::checks`, `Policy::explain` on
//! `policy::decide`'s checks, the JWT validator) and names each failure by the [`crate::proxy::Refusal`] the proxy
//! answers it with, so the two cannot disagree. Unlike the proxy it does not stop at the first failure: it
//! reports every check that can still be evaluated, and why the others could not be. It forwards nothing and never
//! writes the token anywhere.
//!
//! - `certificate`: check 1 offline, with the fix for each refusal.
//! - `token`: the fix line for each audit-token violation.
//! - `input`: the command's inputs: PEM or PKCS#12 chains, a header block as the consumer sends it.
//! - `render`: the verdict as text and as JSON.
//! - `radar`: the credential radar.
//! - `selftest`: what onboarding does in the running proxy: `GET /_ssp/selftest` and the radar's notes.

pub(crate) mod certificate;
pub(crate) mod input;
pub mod radar;
mod render;
pub(crate) mod selftest;
mod token;

use std::time::SystemTime;

use http::{HeaderMap, Method};

use crate::ids::{PeerIdentity, TraceId};
use crate::policy::{Policy, StepOutcome};
use crate::proxy::Refusal;
use crate::proxy::checks::Checks;
use crate::ssp::SspHeaders;

pub use render::verdict_json;

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Could not be evaluated: its detail says why.
    NotRun,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::NotRun => "not_run",
        }
    }
}

/// How the proxy answers a failed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Check 1: the handshake is refused; the label is `ssp_tls_handshake_failures_total`'s `reason`.
    Handshake(&'static str),
    /// Checks 2 to 12: the status and OperationOutcome text of the refusal.
    Http { status: u16, text: String },
}

impl Refused {
    pub(crate) fn of(refusal: &Refusal) -> Self {
        Refused::Http {
            status: refusal.status().as_u16(),
            text: refusal.text(),
        }
    }
}

/// One check of a verdict.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub number: u8,
    pub name: &'static str,
    pub status: Status,
    /// What was found (pass), what is wrong (fail), or why it could not run.
    pub detail: String,
    /// What to change, one line each, in the consumer's terms (a pass may carry a warning).
    pub fixes: Vec<String>,
    /// On a failure: the proxy's answer.
    pub refusal: Option<Refused>,
    /// Check 1's reading of the certificate.
    pub(crate) facts: Option<certificate::Facts>,
}

impl CheckReport {
    pub(crate) fn new(number: u8, name: &'static str) -> Self {
        Self {
            number,
            name,
            status: Status::NotRun,
            detail: String::new(),
            fixes: Vec::new(),
            refusal: None,
            facts: None,
        }
    }

    pub(crate) fn pass(number: u8, name: &'static str, detail: String) -> Self {
        Self {
            status: Status::Pass,
            detail,
            ..Self::new(number, name)
        }
    }

    pub(crate) fn not_run(number: u8, name: &'static str, why: String) -> Self {
        Self {
            detail: why,
            ..Self::new(number, name)
        }
    }

    pub(crate) fn fail(&mut self, detail: String, fix: String) {
        self.status = Status::Fail;
        self.detail = detail;
        self.fixes.push(fix);
    }

    pub(crate) fn refused(
        number: u8,
        name: &'static str,
        refusal: &Refusal,
        detail: String,
        fix: String,
    ) -> Self {
        let mut report = Self::new(number, name);
        report.refusal = Some(Refused::of(refusal));
        report.fail(detail, fix);
        report
    }
}

/// The verdict for one certificate and one sample request.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The policy generation it was decided by (0: the files in `policy.dir`, not yet imported).
    pub policy_generation: u64,
    /// Checks 1 to 12, in order.
    pub checks: Vec<CheckReport>,
}

impl Verdict {
    /// Every check that ran passed (checks that could not run do not fail a verdict by themselves: a check that
    /// could not run always follows a failure, or is one only the running proxy can evaluate).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The proxy's answer to this request: the first failure's.
    pub fn first_refusal(&self) -> Option<&Refused> {
        self.checks
            .iter()
            .find(|c| c.status == Status::Fail)
            .and_then(|c| c.refusal.as_ref())
    }

    /// The numbers of the failed checks.
    pub fn failed(&self) -> Vec<u8> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.number)
            .collect()
    }
}

/// The request a consumer would send: its method, the request target after the proxy's address (the full URL of
/// the provider, `https://...`), and its header fields as sent.
#[derive(Debug, Clone)]
pub struct Sample {
    pub method: Method,
    /// The target URL, without the proxy's leading `/`.
    pub target: String,
    pub headers: HeaderMap,
}

/// What checks 2 to 12 are evaluated against.
#[derive(Debug)]
pub(crate) struct Context<'a> {
    pub checks: &'a Checks,
    pub policy: &'a Policy,
    pub limits: &'a crate::config::LimitsConfig,
    pub now: SystemTime,
}

/// Checks 2 to 12 for `sample`, after check 1 (`first`), from a consumer whose certificate carries `names` (CN and
/// DNS SANs). `live` is how checks 11 and 12 went on the running proxy (`None`: offline, they are not run).
pub(crate) fn evaluate(
    ctx: &Context<'_>,
    first: CheckReport,
    names: Option<&[&str]>,
    sample: &Sample,
    live: Option<[CheckReport; 2]>,
) -> Verdict {
    let mut checks = vec![first];
    let mut headers = sample.headers.clone();
    // What the proxy does before any check reads them: hop-by-hop fields go (RFC 9110 7.6.1).
    let before: Vec<String> = headers.keys().map(|n| n.as_str().to_owned()).collect();
    crate::forward::normalize_request_headers(&mut headers, http::Version::HTTP_11);
    let removed: Vec<String> = before
        .into_iter()
        .filter(|n| !headers.contains_key(n.as_str()))
        .collect();

    // 2: the method.
    checks.push(match ctx.checks.method(&sample.method) {
        Ok(()) => CheckReport::pass(2, "method", format!("{} is allowed", sample.method)),
        Err(refusal) => CheckReport::refused(
            2,
            "method",
            &refusal,
            format!("{} is not allowed", sample.method),
            format!("use one of: {}", ctx.checks.allowed()),
        ),
    });

    // 3: the target.
    let target = Checks::target(&format!("/{}", sample.target));
    checks.push(match &target {
        Ok(t) => CheckReport::pass(3, "target", format!("{} is a valid target URL", t.as_str())),
        Err(refusal) => {
            let why = match refusal {
                Refusal::Target(e) => format!("{e:?}"),
                _ => String::new(),
            };
            CheckReport::refused(
                3,
                "target",
                refusal,
                format!("{} is not a valid target URL ({why})", sample.target),
                "send the provider's full https URL after the proxy's address: \
                 /https://host[:port]/path[?query], no user info, fragment or dot segments"
                    .into(),
            )
        }
    });
    let target = target.ok();

    // 4: the Ssp-* headers (and the header limits the proxy checks first).
    let (fields, refusals) = Checks::header_fields(&headers);
    let mut four = if let Err(refusal) = Checks::header_limits(&headers, ctx.limits) {
        CheckReport::refused(
            4,
            "headers",
            &refusal,
            format!(
                "{} header fields, {} bytes",
                headers.len(),
                crate::proxy::checks::header_bytes(&headers)
            ),
            format!(
                "send at most {} fields and {} bytes of header names and values",
                ctx.limits.max_header_count, ctx.limits.max_header_bytes
            ),
        )
    } else if let Some(first) = refusals.first() {
        let mut report = CheckReport::refused(
            4,
            "headers",
            first,
            format!(
                "missing, repeated or malformed: {}",
                refusals
                    .iter()
                    .filter_map(|r| match r {
                        Refusal::Header(e) => Some(e.0),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            String::new(),
        );
        report.fixes.clear();
        for r in &refusals {
            if let Refusal::Header(e) = r {
                report.fixes.push(header_fix(e.0));
            }
        }
        report
    } else {
        CheckReport::pass(
            4,
            "headers",
            "Ssp-TraceID, Ssp-From, Ssp-To and Ssp-InteractionID are well formed".into(),
        )
    };
    if !removed.is_empty() {
        four.fixes.push(format!(
            "note: hop-by-hop fields are removed before the checks and not forwarded: {}",
            removed.join(", ")
        ));
    }
    checks.push(four);

    // 5 to 9: the directory and the agreements, on the same functions that decide requests.
    let ssp_headers = match (&fields.from, &fields.to, &fields.interaction) {
        (Ok(from), Ok(to), Ok(interaction)) => Some(SspHeaders {
            trace_id: fields
                .trace_id
                .clone()
                .unwrap_or_else(|_| TraceId::new_random()),
            from: from.clone(),
            to: to.clone(),
            interaction: interaction.clone(),
        }),
        _ => None,
    };
    match &ssp_headers {
        Some(h) => {
            let explained = ctx.policy.explain(h, target.as_ref(), names, ctx.now);
            for step in explained.steps {
                checks.push(match (step.outcome, step.denial) {
                    (StepOutcome::Pass, _) => {
                        CheckReport::pass(step.number, step.name, step.detail)
                    }
                    (StepOutcome::Fail, Some(denial)) => {
                        let fix = policy_fix(step.number);
                        CheckReport::refused(
                            step.number,
                            step.name,
                            &Refusal::Denied(denial),
                            step.detail,
                            fix,
                        )
                    }
                    _ => CheckReport::not_run(step.number, step.name, step.detail),
                });
            }
        }
        None => {
            for (number, name) in [
                (5, "fqdn"),
                (6, "sender"),
                (7, "receiver"),
                (8, "agreement"),
                (9, "endpoint"),
            ] {
                checks.push(CheckReport::not_run(
                    number,
                    name,
                    "needs a valid Ssp-From, Ssp-To and Ssp-InteractionID (check 4)".into(),
                ));
            }
        }
    }

    // 10: the audit token.
    checks.push(token::check(ctx, &headers, ssp_headers.as_ref()));

    // 11 and 12: only the running proxy can tell.
    match live {
        Some([limits, audit]) => {
            checks.push(limits);
            checks.push(audit);
        }
        None => {
            checks.push(CheckReport::not_run(11, "limits", limits_text(ctx.limits)));
            checks.push(CheckReport::not_run(
                12,
                "audit",
                "the proxy writes the request record before forwarding; nothing for the consumer to change".into(),
            ));
        }
    }
    Verdict {
        policy_generation: ctx.policy.generation,
        checks,
    }
}

/// The fix line of a bad `Ssp-*` header.
fn header_fix(name: &str) -> String {
    match name {
        "Ssp-TraceID" => "send Ssp-TraceID once, a GUID (8-4-4-4-12 hexadecimal digits), new for each request".into(),
        "Ssp-From" => "send Ssp-From once: the sending system's ASID, digits only".into(),
        "Ssp-To" => "send Ssp-To once: the provider's ASID from SDS, digits only".into(),
        _ => "send Ssp-InteractionID once: the interaction's URN, urn:nhs:names:services:gpconnect:...".into(),
    }
}

/// What a consumer does about a failed check 5 to 9.
fn policy_fix(number: u8) -> String {
    match number {
        5 => "present the certificate issued for the registered FQDN, or have the FQDN in SDS corrected".into(),
        6 => "send from the ASID accredited for this interaction, or have the interaction added to its accreditation".into(),
        7 => "send to the ASID of the endpoint SDS lists for this interaction (Ssp-To)".into(),
        8 => "a data-sharing agreement in force must cover this sender, receiver and interaction: ask the operator".into(),
        _ => "send the registered endpoint URL exactly as SDS holds it (no added port, IP address or other case), \
              followed by the resource path"
            .into(),
    }
}

/// Check 11 offline: the limits in force, which only traffic can trip.
fn limits_text(limits: &crate::config::LimitsConfig) -> String {
    format!(
        "evaluated by the running proxy, per instance: per_consumer_rps = {}, per_consumer_concurrency = {}, \
         per_provider_concurrency = {} (0: unlimited); GET /_ssp/selftest checks it live",
        limits.per_consumer_rps, limits.per_consumer_concurrency, limits.per_provider_concurrency
    )
}

/// The verdict of `ssp onboard check`: check 1 with the consumer listener's verifier built from `config`, checks
/// 2 to 10 against `policy` at the time now, checks 11 and 12 left to the running proxy.
///
/// # Errors
///
/// `server.client_ca` or `server.crl` cannot be read.
pub fn offline(
    config: &crate::config::Config,
    policy: &Policy,
    chain: &[rustls_pki_types::CertificateDer<'static>],
    sample: &Sample,
) -> Result<Verdict, crate::config::Problems> {
    let verifier = crate::tls::client_verifier(&config.server)?;
    let mut roots = Vec::new();
    for path in &config.server.client_ca {
        let certs = crate::tls::load_certs("server.client_ca", path)
            .map_err(crate::config::Problems::one)?;
        roots.extend(
            certs
                .iter()
                .filter_map(crate::tls::peer_identity)
                .map(|p| p.subject),
        );
    }
    let trust = certificate::Trust {
        verifier: verifier.as_ref(),
        roots,
        crls: &config.server.crl,
    };
    let now = SystemTime::now();
    let first = certificate::check(chain, &trust, crate::clock::unix_seconds(now));
    let peer = first.facts.as_ref().map(|f| f.peer.clone());
    let names = peer.as_ref().map(PeerIdentity::names);
    let checks = Checks::new(config.server.methods.clone(), &config.jwt);
    let ctx = Context {
        checks: &checks,
        policy,
        limits: &config.limits,
        now,
    };
    Ok(evaluate(&ctx, first, names.as_deref(), sample, None))
}
