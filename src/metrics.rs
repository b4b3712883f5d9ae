//! Metric names and handles (DESIGN.md 1.7), registered once at start in one registry. Every label value comes
//! from a bounded set: interactions the policy knows (anything else is `other`), fixed reason and outcome names,
//! status classes, and certificate names from the config. A trace id or URL is never a label; an ASID is one only in
//! `ssp_consumer_cert_expiry_timestamp_seconds`, and only a registered consumer's (bounded by the directory).
//!
//! Owns names and updates; the admin listener (`admin`) renders them. Does not touch the request pipeline's logic.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets (seconds) from 0.5 ms to 60 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Audit write buckets (seconds) from 50 µs to 1 s.
const AUDIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// The label for interactions the policy does not know.
pub(crate) const OTHER: &str = "other";

/// Every `reason` of `ssp_denials_total`: one per refusal of DESIGN.md 1.4. Each series exists at 0 from start,
/// so that `increase()` sees the first event.
pub(crate) const DENIAL_REASONS: &[&str] = &[
    "request_header_fields_too_large",
    "method_not_allowed",
    "invalid_target_url",
    "missing_or_invalid_header",
    "fqdn_check_failed",
    "asid_check_failed",
    "partykey_interaction_check_failed",
    "fot_check_failed",
    "endpoint_varies_from_target_url",
    "invalid_jwt",
    "consumer_rate_limit",
    "consumer_concurrency_limit",
    "provider_concurrency_limit",
    "audit_unavailable",
    "invalid_host",
    "invalid_transfer_encoding",
    "transfer_coding_not_implemented",
    "malformed_request_body",
    "error_communicating_to_endpoint",
    "timeout_communicating_to_endpoint",
    // The patient-facing door's own.
    "invalid_request_id",
    "invalid_correlation_id",
    "access_token_in_query",
    "access_token_missing",
    "access_token_invalid",
    "access_token_keys_unavailable",
    "proofing_level_too_low",
    "scope_missing",
    "nhs_number_missing",
    "route_not_found",
    "patient_mismatch",
    "app_rate_limit",
    "practice_not_found",
    "interaction_not_at_practice",
    "supplier_not_configured",
    "token_exchange_refused",
    "token_exchange_failed",
];

/// Every `reason` of `ssp_tls_handshake_failures_total` ([`crate::tls::failure_reason`], plus the listener's own).
pub(crate) const TLS_FAILURE_REASONS: &[&str] = &[
    "no_certificate",
    "certificate_revoked",
    "certificate_expired",
    "certificate_not_yet_valid",
    "crl_expired",
    "unknown_issuer",
    "certificate_invalid",
    "incompatible",
    "protocol",
    "other",
    "io",
    "timeout",
    "plaintext_http",
    "proxy_header_missing",
    "proxy_header_invalid",
    "proxy_header_untrusted",
];

/// Every `outcome` of `ssp_patient_facing_token_exchanges_total`.
pub(crate) const EXCHANGE_OUTCOMES: &[&str] = &["cached", "exchanged", "refused", "failed"];

/// Every `kind` of `ssp_upstream_errors_total`.
pub(crate) const UPSTREAM_ERROR_KINDS: &[&str] = &["upstream_error", "timeout"];

/// Every `reason` of `ssp_connections_cut_total`: a consumer that accepted no response bytes for
/// `upstream.body_idle_timeout`; an HTTP/2 consumer that cancelled too many of its streams before their answers.
pub(crate) const CUT_REASONS: &[&str] = &["send_timeout", "premature_resets"];

/// Every `kind` of `ssp_consumer_cert_warnings_total`.
pub(crate) const CONSUMER_CERT_WARNINGS: &[&str] = &["fqdn_mismatch", "issuer_changed"];

/// Every `result` of the reload counters.
const RELOAD_RESULTS: &[&str] = &["ok", "refused"];

/// Every metric of the proxy.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: Histogram,
    denials: IntCounterVec,
    tls_failures: IntCounterVec,
    pub connections_active: IntGauge,
    pub connections_total: IntCounter,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    upstream_errors: IntCounterVec,
    token_exchanges: IntCounterVec,
    connections_cut: IntCounterVec,
    pub audit_records: IntCounter,
    pub audit_write_seconds: Histogram,
    pub audit_queue_depth: IntGauge,
    pub audit_writer_handoffs: IntCounter,
    pub audit_writes_on_thread: IntGauge,
    /// `[audit.ship]`: the shipper's progress (registered, and 0, without it).
    pub ship: ShipMetrics,
    pub policy_generation: IntGauge,
    policy_reloads: IntCounterVec,
    tls_reloads: IntCounterVec,
    certificate_expiry: prometheus::GaugeVec,
    crl_next_update: prometheus::GaugeVec,
    consumer_cert_expiry: prometheus::GaugeVec,
    consumer_cert_warnings: IntCounterVec,
}

/// The shipper's metrics: how far the collector is behind the log, and what was confirmed.
#[derive(Debug, Clone)]
pub struct ShipMetrics {
    /// `ssp_audit_ship_lag_records`: records written and not yet confirmed at the collector.
    pub lag_records: IntGauge,
    /// `ssp_audit_ship_lag_seconds`: age of the oldest record not yet confirmed (0 when none is waiting).
    pub lag_seconds: prometheus::Gauge,
    /// `ssp_audit_shipped_records_total`: records the collector confirmed (a record sent again after a failed
    /// connection counts once).
    pub shipped: IntCounter,
    /// `ssp_audit_ship_heads_total`: signed chain heads the collector confirmed.
    pub heads: IntCounter,
    /// `ssp_audit_ship_failures_total`: connections that failed before the collector confirmed them.
    pub failures: IntCounter,
}

impl ShipMetrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let lag_seconds = prometheus::Gauge::new(
            "ssp_audit_ship_lag_seconds",
            "Age of the oldest audit record not yet confirmed by the collector",
        )?;
        r.register(Box::new(lag_seconds.clone()))?;
        Ok(Self {
            lag_records: gauge(
                r,
                "ssp_audit_ship_lag_records",
                "Audit records written and not yet confirmed by the collector",
            )?,
            lag_seconds,
            shipped: counter(
                r,
                "ssp_audit_shipped_records_total",
                "Audit records the collector confirmed",
            )?,
            heads: counter(
                r,
                "ssp_audit_ship_heads_total",
                "Signed chain heads the collector confirmed",
            )?,
            failures: counter(
                r,
                "ssp_audit_ship_failures_total",
                "Connections to the collector that failed before it confirmed them",
            )?,
        })
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Registers every metric. Fails only on a programming error (a duplicate or malformed name).
    pub(crate) fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "ssp_requests_total",
            "Requests answered, by interaction, outcome and status class",
            &["interaction", "outcome", "status_class"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "ssp_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(BUCKETS.to_vec()),
            &["interaction"],
        )?;
        r.register(Box::new(request_duration.clone()))?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "ssp_upstream_duration_seconds",
                "Time until the provider's response headers",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        r.register(Box::new(upstream_duration.clone()))?;
        let denials = counter_vec(
            &r,
            "ssp_denials_total",
            "Requests refused, by reason",
            &["reason"],
        )?;
        let tls_failures = counter_vec(
            &r,
            "ssp_tls_handshake_failures_total",
            "Consumer TLS handshakes refused, by reason",
            &["reason"],
        )?;
        let connections_active = gauge(
            &r,
            "ssp_connections_active",
            "Consumer connections open now",
        )?;
        let connections_total =
            counter(&r, "ssp_connections_total", "Consumer connections accepted")?;
        let bytes = counter_vec(
            &r,
            "ssp_bytes_total",
            "Body bytes streamed: in = consumer to provider, out = provider to consumer",
            &["direction"],
        )?;
        let upstream_errors = counter_vec(
            &r,
            "ssp_upstream_errors_total",
            "Failed exchanges with providers, by kind",
            &["kind"],
        )?;
        let token_exchanges = counter_vec(
            &r,
            "ssp_patient_facing_token_exchanges_total",
            "Supplier tokens for patient-facing requests, by outcome: cached, exchanged, refused, failed",
            &["outcome"],
        )?;
        let connections_cut = counter_vec(
            &r,
            "ssp_connections_cut_total",
            "Consumer connections ended by the proxy for the consumer's conduct, by reason",
            &["reason"],
        )?;
        let audit_records = counter(&r, "ssp_audit_records_total", "Audit records written")?;
        let audit_write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "ssp_audit_write_seconds",
                "Time to write (and in strict mode fsync) an audit batch",
            )
            .buckets(AUDIT_BUCKETS.to_vec()),
        )?;
        r.register(Box::new(audit_write_seconds.clone()))?;
        let audit_queue_depth = gauge(
            &r,
            "ssp_audit_queue_depth",
            "Audit records waiting for the writer",
        )?;
        let audit_writer_handoffs = counter(
            &r,
            "ssp_audit_writer_handoffs_total",
            "Times a worker's audit write was slow (over 5 ms) or failed and the ssp-audit thread took over writing",
        )?;
        let audit_writes_on_thread = gauge(
            &r,
            "ssp_audit_writes_on_thread",
            "1 while the ssp-audit thread writes every audit record after a hand-off (batched durability)",
        )?;
        let ship = ShipMetrics::new(&r)?;
        let policy_generation = gauge(
            &r,
            "ssp_policy_generation",
            "The policy generation in force",
        )?;
        let policy_reloads = counter_vec(
            &r,
            "ssp_policy_reloads_total",
            "Policy reloads, by result",
            &["result"],
        )?;
        let tls_reloads = counter_vec(
            &r,
            "ssp_tls_reloads_total",
            "Certificate, key, CA and CRL reloads, by result",
            &["result"],
        )?;
        let certificate_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "ssp_certificate_expiry_timestamp_seconds",
                "notAfter of each certificate in use",
            ),
            &["cert"],
        )?;
        r.register(Box::new(certificate_expiry.clone()))?;
        let crl_next_update = prometheus::GaugeVec::new(
            Opts::new(
                "ssp_crl_next_update_timestamp_seconds",
                "nextUpdate of each server.crl file (the earliest of its CRLs)",
            ),
            &["crl"],
        )?;
        r.register(Box::new(crl_next_update.clone()))?;
        let consumer_cert_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "ssp_consumer_cert_expiry_timestamp_seconds",
                "The soonest notAfter of the certificates each registered consumer ASID presented within radar.window",
            ),
            &["asid"],
        )?;
        r.register(Box::new(consumer_cert_expiry.clone()))?;
        let consumer_cert_warnings = counter_vec(
            &r,
            "ssp_consumer_cert_warnings_total",
            "Consumer certificates not as the directory or the last one: fqdn_mismatch (check 5 refused a registered \
             ASID's certificate), issuer_changed (an ASID's new certificate has another CA than its last)",
            &["kind"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("ssp_build_info", "The running build"),
            &["version"],
        )?;
        r.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series with a bounded, known label set exist at 0 from start: a rule on `increase()` then fires on
        // the first event, not the second.
        for (vec, labels) in [
            (&denials, DENIAL_REASONS),
            (&tls_failures, TLS_FAILURE_REASONS),
            (&upstream_errors, UPSTREAM_ERROR_KINDS),
            (&token_exchanges, EXCHANGE_OUTCOMES),
            (&connections_cut, CUT_REASONS),
            (&consumer_cert_warnings, CONSUMER_CERT_WARNINGS),
            (&policy_reloads, RELOAD_RESULTS),
            (&tls_reloads, RELOAD_RESULTS),
        ] {
            for label in labels {
                let _ = vec.with_label_values(&[label]);
            }
        }
        Ok(Self {
            bytes_in: bytes.with_label_values(&["in"]),
            bytes_out: bytes.with_label_values(&["out"]),
            registry: r,
            requests,
            request_duration,
            upstream_duration,
            denials,
            tls_failures,
            connections_active,
            connections_total,
            upstream_errors,
            token_exchanges,
            connections_cut,
            audit_records,
            audit_write_seconds,
            audit_queue_depth,
            audit_writer_handoffs,
            audit_writes_on_thread,
            ship,
            policy_generation,
            policy_reloads,
            tls_reloads,
            certificate_expiry,
            crl_next_update,
            consumer_cert_expiry,
            consumer_cert_warnings,
        })
    }

    /// An exchange or refusal has ended. `interaction` must already be bounded (a known URN or [`OTHER`]).
    pub(crate) fn request_done(
        &self,
        interaction: &str,
        outcome: &str,
        status: u16,
        total: Duration,
    ) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.requests
            .with_label_values(&[interaction, outcome, class])
            .inc();
        self.request_duration
            .with_label_values(&[interaction])
            .observe(total.as_secs_f64());
    }

    pub fn upstream(&self, headers_after: Duration, bytes_in: u64, bytes_out: u64) {
        self.upstream_duration.observe(headers_after.as_secs_f64());
        self.bytes_in.inc_by(bytes_in);
        self.bytes_out.inc_by(bytes_out);
    }

    pub(crate) fn denied(&self, reason: &'static str) {
        self.denials.with_label_values(&[reason]).inc();
    }

    /// A patient-facing request's supplier token; `outcome` is one of [`EXCHANGE_OUTCOMES`].
    pub(crate) fn token_exchange(&self, outcome: &'static str) {
        self.token_exchanges.with_label_values(&[outcome]).inc();
    }

    pub(crate) fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// A consumer connection the proxy ended for the consumer's conduct; `reason` is one of [`CUT_REASONS`].
    pub(crate) fn connection_cut(&self, reason: &'static str) {
        self.connections_cut.with_label_values(&[reason]).inc();
    }

    pub(crate) fn tls_failure(&self, reason: &'static str) {
        self.tls_failures.with_label_values(&[reason]).inc();
    }

    pub(crate) fn policy_reload(&self, ok: bool) {
        self.policy_reloads
            .with_label_values(&[if ok { "ok" } else { "refused" }])
            .inc();
    }

    pub(crate) fn tls_reload(&self, ok: bool) {
        self.tls_reloads
            .with_label_values(&[if ok { "ok" } else { "refused" }])
            .inc();
    }

    /// Sets `ssp_certificate_expiry_timestamp_seconds` for each named certificate.
    pub(crate) fn certificates(&self, expiries: &[(String, i64)]) {
        for (name, not_after) in expiries {
            self.certificate_expiry
                .with_label_values(&[name])
                .set(*not_after as f64);
        }
    }

    /// Sets `ssp_consumer_cert_expiry_timestamp_seconds` to exactly these (ASID, soonest notAfter) pairs: the
    /// radar passes registered ASIDs only, so the series stay bounded by the directory.
    pub(crate) fn consumer_cert_expiries(&self, expiries: &[(String, i64)]) {
        self.consumer_cert_expiry.reset();
        for (asid, not_after) in expiries {
            self.consumer_cert_expiry
                .with_label_values(&[asid.as_str()])
                .set(*not_after as f64);
        }
    }

    /// Counts a consumer certificate warning (one of [`CONSUMER_CERT_WARNINGS`]).
    pub(crate) fn consumer_cert_warning(&self, kind: &'static str) {
        self.consumer_cert_warnings.with_label_values(&[kind]).inc();
    }

    /// Sets `ssp_crl_next_update_timestamp_seconds` for each CRL file in force, dropping files no longer named.
    pub(crate) fn crl_next_updates(&self, crls: &[crate::tls::CrlFile]) {
        self.crl_next_update.reset();
        for crl in crls {
            if let Some(next) = crl.next_update {
                self.crl_next_update
                    .with_label_values(&[crl.label.as_str()])
                    .set(next as f64);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::error!(error = %e, "cannot render metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_design_metric_is_exposed() {
        let m = Metrics::new().unwrap();
        m.request_done("other", "denied", 403, Duration::from_millis(1));
        m.denied("asid_check_failed");
        m.upstream_error("unreachable");
        m.tls_failure("certificate_revoked");
        m.policy_reload(true);
        m.certificates(&[("server".into(), 2_000_000_000)]);
        let text = m.render();
        for name in [
            "ssp_requests_total",
            "ssp_request_duration_seconds",
            "ssp_upstream_duration_seconds",
            "ssp_denials_total",
            "ssp_tls_handshake_failures_total",
            "ssp_connections_active",
            "ssp_connections_total",
            "ssp_bytes_total",
            "ssp_upstream_errors_total",
            "ssp_patient_facing_token_exchanges_total",
            "ssp_audit_records_total",
            "ssp_audit_write_seconds",
            "ssp_audit_queue_depth",
            "ssp_audit_writer_handoffs_total",
            "ssp_audit_writes_on_thread",
            "ssp_audit_ship_lag_records",
            "ssp_audit_ship_lag_seconds",
            "ssp_audit_shipped_records_total",
            "ssp_audit_ship_heads_total",
            "ssp_audit_ship_failures_total",
            "ssp_policy_generation",
            "ssp_policy_reloads_total",
            "ssp_certificate_expiry_timestamp_seconds",
            "ssp_build_info",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains(
            r#"ssp_requests_total{interaction="other",outcome="denied",status_class="4xx"} 1"#
        ));
    }
}
