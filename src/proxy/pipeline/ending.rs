//! Every way a request ends, in one place: its `response` record (and for a refusal its `request` record too), its
//! metrics and its operational log line, whichever way it ends.
//!
//! - Refused before check 12 ([`Proxy::end_refused`], [`Proxy::end_patient_refused`]): both records from what the
//!   request carried, `ssp_denials_total` and `ssp_requests_total{outcome="denied"}`.
//! - Permitted: [`Proxy::open_exchange`] opens the audit transaction (check 12) and returns the [`Ending`] that
//!   ends it. Its request record not durable in time: [`Ending::unavailable`] (503 `AUDIT_UNAVAILABLE`). Forwarded:
//!   the response and request bodies hold the `Ending` (through `forward::SharedExchange`), and when the last of
//!   them lets go, its own `Drop` ends the exchange as its counters say: completed, the provider failed (502, 504),
//!   or the consumer gone (`client_closed`, also when the request was dropped while its record was being written).
//! - A patient-facing request whose consumer went away during the supplier token exchange ([`AbandonedExchange`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderValue;
use tokio::time::Instant;

use super::super::patient_refusal::PatientRefusal;
use super::super::refusal::Refusal;
use super::super::{ConnControl, ConnInfo, Cut};
use super::Proxy;
use crate::audit::writer::Open;
use crate::audit::{Completion, Outcome, Record, Transaction};
use crate::forward::{Exchange, HoldsExchange};
use crate::limits::Admission;
use crate::metrics::{Metrics, OTHER};

/// An exchange the consumer cancels sooner than this after its start counts as a premature reset (Envoy's
/// `premature_reset_min_stream_lifetime_seconds`, 1 s by default): counted whether or not its response head had
/// come, since either way its provider connection is closed.
const PREMATURE_RESET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(1);

/// A permitted request from the moment its request record is queued until it ends, exactly once: the exchange's
/// counters, the open audit transaction, and what its end frees (its consumer and provider limits).
#[derive(Debug)]
pub(crate) struct Ending {
    exchange: Exchange,
    tx: Arc<Transaction>,
    /// Ended by `Drop`, once.
    open: Option<Open>,
    /// Its consumer and provider limits, free again when it ends.
    admission: Option<Admission>,
    metrics: Arc<Metrics>,
    control: Arc<ConnControl>,
    /// Refused (503 `AUDIT_UNAVAILABLE`, [`Ending::unavailable`]): `Drop` ends it with a `denied` response record
    /// (kept only if its request record reaches the log) and no exchange metrics (the refusal's are counted).
    refused: AtomicBool,
}

impl HoldsExchange for Ending {
    fn exchange(&self) -> &Exchange {
        &self.exchange
    }
}

impl Proxy {
    /// Check 12, and the exchange it opens: `record`, the request record of `tx`, queued and made durable (per
    /// `audit.durability`) before anything is forwarded. `None`: the request is refused with 503
    /// `AUDIT_UNAVAILABLE` (the caller answers it); it has ended already, with a `response` record saying so if
    /// its request record may be in the log.
    ///
    /// Dropped while it waits (the consumer went away: an HTTP/2 stream reset, a closed connection), the
    /// `Ending` it holds ends the exchange `client_closed` (its records withdrawn if no writer has taken them).
    pub(super) async fn open_exchange(
        &self,
        tx: &Arc<Transaction>,
        record: Record,
        admission: Admission,
        started: Instant,
        conn: &ConnInfo,
    ) -> Option<Arc<Ending>> {
        let open = self.audit.open(record).await.ok()?;
        let ending = Arc::new(Ending {
            exchange: Exchange::new(started),
            tx: Arc::clone(tx),
            open: Some(open),
            admission: Some(admission),
            metrics: Arc::clone(&self.metrics),
            control: Arc::clone(&conn.control),
            refused: AtomicBool::new(false),
        });
        if let Some(scan) = tx.body_scan() {
            ending.exchange.copy_request_body(Arc::clone(scan));
        }
        let durable = match &ending.open {
            Some(open) => open.durable().await.is_ok(),
            None => false,
        };
        if !durable {
            ending.unavailable();
            return None;
        }
        Some(ending)
    }

    /// A request refused before check 12: `ssp_denials_total`, `ssp_requests_total{outcome="denied"}` for the
    /// interaction it named (when the policy knows it), and, unless the log itself refused it (503
    /// `AUDIT_UNAVAILABLE`), its `request` and `response` records from the raw (bounded) values it carried.
    #[allow(
        clippy::too_many_arguments,
        reason = "what a refused request's records and metrics name, each from its own step"
    )]
    pub(super) fn end_refused(
        &self,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        refusal: Refusal,
        text: String,
        status: u16,
        interaction: &str,
        started: Instant,
        generation: u64,
    ) {
        let asids = (
            parts.headers.get(crate::ssp::HEADER_FROM).cloned(),
            parts.headers.get(crate::ssp::HEADER_TO).cloned(),
        );
        log_refusal(
            &refusal,
            conn,
            parts.headers.get(crate::ssp::HEADER_TRACE_ID),
            &asids,
        );
        let unavailable = matches!(refusal, Refusal::AuditUnavailable);
        self.refusal_done(
            refusal.reason(),
            interaction,
            status,
            started,
            unavailable,
            || {
                let tx = Transaction::refused(
                    conn.id,
                    &conn.audit_peer,
                    parts,
                    generation,
                    self.patients.as_ref(),
                );
                let jwt = match refusal {
                    Refusal::Jwt(_, audit) => Some(audit),
                    _ => None,
                };
                // A reason can quote the target (`..._VARIES_FROM_TARGETURL_<target>`): redacted as the target is.
                let text = match &self.patients {
                    Some(indexer) => indexer.redact_text(text),
                    None => text,
                };
                (tx, text, jwt)
            },
        );
    }

    /// What every refusal before check 12 ends with: `ssp_denials_total` for `reason`,
    /// `ssp_requests_total{outcome="denied"}`, and, unless the log itself refused the request (`unavailable`), its
    /// `request` record (`decision: deny`, from the transaction, text and token audit `records` makes) and its
    /// `response` record with `status`.
    fn refusal_done(
        &self,
        reason: &'static str,
        interaction: &str,
        status: u16,
        started: Instant,
        unavailable: bool,
        records: impl FnOnce() -> (Arc<Transaction>, String, Option<Box<crate::jwt::JwtAudit>>),
    ) {
        self.metrics.denied(reason);
        self.metrics
            .request_done(interaction, "denied", status, started.elapsed());
        if unavailable {
            return;
        }
        let (tx, text, jwt) = records();
        self.audit.submit(Record::refused(&tx, text, jwt));
        self.audit
            .submit(Record::denied(&tx, status, started.elapsed()));
    }

    /// A patient-facing request refused before check 12: as [`Proxy::end_refused`], its records naming the
    /// door's ASID and what was read of the app's token before the refusal.
    #[allow(
        clippy::too_many_arguments,
        reason = "what a refused request's records and metrics name, each from its own step"
    )]
    pub(super) fn end_patient_refused(
        &self,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        refusal: &PatientRefusal,
        status: u16,
        door_asid: &crate::ids::Asid,
        access: crate::audit::PatientAccess,
        started: Instant,
        generation: u64,
    ) {
        tracing::info!(
            conn = conn.id,
            reason = refusal.reason(),
            status = refusal.status().as_u16(),
            "patient-facing request refused"
        );
        let unavailable = matches!(refusal, PatientRefusal::AuditUnavailable);
        self.refusal_done(
            refusal.reason(),
            OTHER,
            status,
            started,
            unavailable,
            || {
                let tx = Transaction::refused_patient_facing(
                    conn.id,
                    &conn.audit_peer,
                    parts,
                    generation,
                    door_asid,
                    access,
                    self.patients.as_ref(),
                );
                (tx, refusal.audit_text(), None)
            },
        );
    }
}

impl Ending {
    /// Its request record was not durable in time: the request is refused with 503 `AUDIT_UNAVAILABLE` and never
    /// forwarded. Given up while its write was stuck (5 s), the request record may still reach the log: a
    /// `response` record saying the request was refused then follows it (none if it was withdrawn). The metrics
    /// are the refusal's ([`Proxy::end_refused`]).
    fn unavailable(&self) {
        self.refused.store(true, Ordering::Release);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        // The exchange is over: its consumer and provider limits are free again.
        drop(self.admission.take());
        let Some(open) = self.open.take() else {
            return;
        };
        let tx = &self.tx;
        if self.refused.load(Ordering::Acquire) {
            let status = Refusal::AuditUnavailable.status().as_u16();
            open.end(Record::denied(
                tx,
                status,
                self.exchange.started().elapsed(),
            ));
            return;
        }
        let end = self.exchange.summary();
        let metrics = &self.metrics;
        let [from, to, interaction] = tx.parties().map(|p| p.unwrap_or(OTHER));
        // A permitted interaction is one the policy names, so it is a bounded label.
        metrics.request_done(interaction, end.outcome.as_str(), end.status, end.total);
        metrics.upstream(end.upstream, end.bytes_in, end.bytes_out);
        match end.outcome {
            Outcome::UpstreamError => metrics.upstream_error("upstream_error"),
            Outcome::Timeout if !end.consumer_stalled => metrics.upstream_error("timeout"),
            _ => {}
        }
        // Cancelled by the consumer within a second of its start (Envoy's premature reset): the provider
        // connection it was on is closed mid-request or mid-response, and a new one is dialled for the next.
        let premature =
            end.outcome == Outcome::ClientClosed && end.total < PREMATURE_RESET_LIFETIME;
        if self.control.exchange_ended(premature) {
            tracing::info!(
                conn = tx.conn_id(),
                "consumer cancelled too many requests within a second of their start; closing its connection"
            );
            metrics.connection_cut("premature_resets");
            self.control.cut(Cut::GoAway);
        }
        // A completed exchange is a debug line: the audit trail is its record, and a line per request at
        // national volumes would be rate-limited by the journal anyway. One that failed is an event.
        macro_rules! exchange_line {
            ($level:ident) => {
                tracing::$level!(
                    conn = tx.conn_id(),
                    trace_id = %tx.trace_id().unwrap_or("-"),
                    from = %from,
                    to = %to,
                    interaction = %interaction,
                    status = end.status,
                    bytes_in = end.bytes_in,
                    bytes_out = end.bytes_out,
                    upstream_ms = crate::audit::millis(end.upstream),
                    total_ms = crate::audit::millis(end.total),
                    outcome = end.outcome.as_str(),
                    consumer_stalled = end.consumer_stalled,
                    retried = end.retried,
                    "exchange"
                )
            };
        }
        if end.outcome == Outcome::Ok {
            exchange_line!(debug);
        } else {
            exchange_line!(info);
        }
        open.end(Record::completed(tx, end));
    }
}

/// The records of a patient-facing request whose consumer went away while its supplier token was being exchanged
/// (the patient's token has gone to the token endpoint, so the request is not without a trace): a refused
/// `request` record and a `client_closed` response with status 499 (nginx's "client closed request"), written
/// when it is dropped armed.
pub(super) struct AbandonedExchange<'p> {
    pub(super) proxy: &'p Proxy,
    pub(super) tx: Option<Arc<Transaction>>,
    pub(super) started: Instant,
}

impl AbandonedExchange<'_> {
    /// The exchange answered: nothing to record here.
    pub(super) fn disarm(mut self) {
        self.tx = None;
    }
}

impl Drop for AbandonedExchange<'_> {
    fn drop(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let audit = &self.proxy.audit;
        audit.submit(Record::refused(
            &tx,
            "CLIENT_CLOSED_DURING_TOKEN_EXCHANGE".into(),
            None,
        ));
        audit.submit(Record::completed(
            &tx,
            Completion {
                status: 499,
                bytes_in: 0,
                bytes_out: 0,
                upstream: std::time::Duration::ZERO,
                total: self.started.elapsed(),
                retried: false,
                outcome: Outcome::ClientClosed,
                consumer_stalled: false,
            },
        ));
    }
}

/// One operational log line per refusal: trace id, ASIDs and a bounded reason. Never the target URL (it can
/// carry patient identifiers), never a token.
pub(super) fn log_refusal(
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
            check = d.number(),
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
