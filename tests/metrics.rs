//! The admin listener over a real socket: `/metrics` counters and histograms move by exactly what a permitted, a
//! denied and a failed request should add, the exposition parses as Prometheus text, and `/healthz` / `/readyz`
//! answer as documented.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

/// GET over plain HTTP on the admin listener.
async fn admin_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    let status = response.status();
    if path == "/metrics" {
        // Prometheus' text format names its version (exposition formats, text format 0.0.4).
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Parses the text exposition strictly enough to catch a malformed line: `name{labels} value`, comments `# HELP`
/// and `# TYPE`.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut series = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !metric.is_empty(),
            "bad metric name: {line}"
        );
        assert!(
            !name.contains('{') || name.ends_with('}'),
            "bad labels: {line}"
        );
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        series.insert(name.to_owned(), value);
    }
    series
}

async fn scrape(w: &World) -> HashMap<String, f64> {
    let (status, text) = admin_get(w.admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    parse(&text)
}

/// A permitted, a denied and a failed request move each counter and histogram by exactly the right amount.
#[tokio::test]
async fn metrics_move_by_exactly_what_each_request_adds() {
    let w = World::start().await;
    let before = scrape(&w).await;

    let ok = within(
        "ok",
        w.consumer("consumer").fetch(
            ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    let denied = within(
        "denied",
        w.consumer("consumer").fetch(
            ssp_request(
                Method::GET,
                &format!("/{}/fhir/Appointment/1", w.url),
                APPOINTMENT,
            )
            .body(empty())
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let mut failing = ssp_request(
        Method::GET,
        &format!(
            "/https://provider2.dev.localhost:{}/gp/fhir/metadata",
            w.down.port()
        ),
        METADATA,
    )
    .body(empty())
    .unwrap();
    failing
        .headers_mut()
        .insert("Ssp-To", TO_DOWN.parse().unwrap());
    assert_eq!(
        within("failed", w.consumer("consumer").fetch(failing))
            .await
            .unwrap()
            .status,
        StatusCode::BAD_GATEWAY
    );
    // Response records are written as exchanges end, after their metrics: wait for all six records.
    w.records(6).await;

    let after = scrape(&w).await;
    let delta = |series: &str| {
        after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
    };
    let requests = |interaction: &str, outcome: &str, class: &str| {
        delta(&format!(
            r#"ssp_requests_total{{interaction="{interaction}",outcome="{outcome}",status_class="{class}"}}"#
        ))
    };
    assert_eq!(requests(METADATA, "ok", "2xx"), 1.0);
    // The appointment interaction is in no system or endpoint of the test policy: a bounded `other` label.
    assert_eq!(requests("other", "denied", "4xx"), 1.0);
    assert_eq!(requests(METADATA, "upstream_error", "5xx"), 1.0);
    assert_eq!(
        delta(r#"ssp_denials_total{reason="asid_check_failed"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"ssp_upstream_errors_total{kind="upstream_error"}"#),
        1.0
    );
    assert_eq!(
        delta(&format!(
            r#"ssp_request_duration_seconds_count{{interaction="{METADATA}"}}"#
        )),
        2.0
    );
    assert_eq!(
        delta(r#"ssp_request_duration_seconds_count{interaction="other"}"#),
        1.0
    );
    assert_eq!(delta("ssp_upstream_duration_seconds_count"), 2.0);
    assert_eq!(
        delta(r#"ssp_bytes_total{direction="out"}"#),
        ok.body.len() as f64
    );
    assert_eq!(delta("ssp_audit_records_total"), 6.0);
    assert_eq!(delta("ssp_connections_total"), 3.0);
    assert_eq!(after["ssp_policy_generation"], 1.0);
    assert_eq!(
        after[&format!(
            r#"ssp_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    assert!(after[r#"ssp_certificate_expiry_timestamp_seconds{cert="server"}"#] > 1.7e9);
    // An ASID is a label only of the consumer certificate gauge (registered consumers, bounded by the directory).
    assert!(
        !after.keys().any(|k| {
            (k.contains(FROM) && !k.starts_with("ssp_consumer_cert_expiry_timestamp_seconds{"))
                || k.contains(TRACE_ID)
        }),
        "an ASID or trace id became a label"
    );
}

/// A refused handshake is counted by reason.
#[tokio::test]
async fn tls_failures_are_counted_by_reason() {
    let w = World::start().await;
    let before = scrape(&w).await;
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    assert!(
        within("revoked", w.consumer("consumer-revoked").fetch(req))
            .await
            .is_err()
    );
    // The client sees the proxy's alert before the proxy has necessarily counted the failure: wait for the count.
    let series = r#"ssp_tls_handshake_failures_total{reason="certificate_revoked"}"#;
    let counted = |m: &HashMap<String, f64>| {
        m.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
    };
    let after = within("the handshake failure to be counted", async {
        loop {
            let after = scrape(&w).await;
            if counted(&after) != 0.0 {
                break after;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(counted(&after), 1.0, "{after:?}");
}

/// `/healthz` answers while the process runs; `/readyz` is 200 when serving with a writable audit log and 503 once
/// the log cannot be written.
#[tokio::test]
async fn health_and_readiness() {
    let w = World::start().await;
    assert_eq!(admin_get(w.admin, "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        admin_get(w.admin, "/readyz").await,
        (StatusCode::OK, "ready\n".to_owned())
    );
    assert_eq!(
        admin_get(w.admin, "/nothing").await.0,
        StatusCode::NOT_FOUND
    );

    let broken = World::start_with(Setup {
        extra_audit: "segment_size = \"4KiB\"".into(),
        ..Setup::default()
    })
    .await;
    broken.break_audit_log().await;
    assert_eq!(admin_get(broken.admin, "/healthz").await.0, StatusCode::OK);
    let (status, text) = admin_get(broken.admin, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("audit log not writable"), "{text}");
}

/// A fresh `ssp serve` process exposes every series with a known, bounded label set at 0 before anything has
/// happened, so that a rule on `increase()` fires on the first event: each denial reason, each handshake failure
/// reason, each upstream error kind, both reload results.
#[tokio::test]
async fn a_fresh_process_exposes_every_bounded_series_at_zero() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let admin = closed_port().await;
    let _served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            admin: admin.to_string(),
            ..Setup::default()
        },
        &[],
        ChildLog::Null,
    )
    .await;
    // The start-up probe's TCP connection may be accepted after the listener is up and before or after the first
    // scrape: wait until the proxy has accepted and closed it, so that a handshake failure it caused would show.
    let (text, series) = within("the start-up probe's connection to be closed", async {
        loop {
            let (status, text) = admin_get(admin, "/metrics").await;
            assert_eq!(status, StatusCode::OK);
            let series = parse(&text);
            if series.get("ssp_connections_total") == Some(&1.0)
                && series.get("ssp_connections_active") == Some(&0.0)
            {
                break (text, series);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut expected: Vec<String> = Vec::new();
    // The documented reasons, written out here (not read from the crate), so that a dropped one fails.
    for reason in [
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
        "error_communicating_to_endpoint",
        "timeout_communicating_to_endpoint",
    ] {
        expected.push(format!("ssp_denials_total{{reason=\"{reason}\"}}"));
    }
    for reason in [
        "no_certificate",
        "certificate_revoked",
        "certificate_expired",
        "crl_expired",
        "unknown_issuer",
        "certificate_invalid",
        "incompatible",
        "protocol",
        "other",
        "io",
        "timeout",
        "plaintext_http",
    ] {
        expected.push(format!(
            "ssp_tls_handshake_failures_total{{reason=\"{reason}\"}}"
        ));
    }
    for kind in ["upstream_error", "timeout"] {
        expected.push(format!("ssp_upstream_errors_total{{kind=\"{kind}\"}}"));
    }
    for result in ["ok", "refused"] {
        expected.push(format!("ssp_policy_reloads_total{{result=\"{result}\"}}"));
        expected.push(format!("ssp_tls_reloads_total{{result=\"{result}\"}}"));
    }
    for direction in ["in", "out"] {
        expected.push(format!("ssp_bytes_total{{direction=\"{direction}\"}}"));
    }
    // The start-up probe's TCP connection is counted in the connection metrics, but it is no handshake failure.
    for name in [
        "ssp_audit_records_total",
        "ssp_audit_queue_depth",
        "ssp_upstream_duration_seconds_count",
        "ssp_audit_write_seconds_count",
    ] {
        expected.push(name.to_owned());
    }
    for name in &expected {
        assert_eq!(series.get(name), Some(&0.0), "{name} in:\n{text}");
    }
    // Present with a value from the start: the policy generation, the build, the certificates and the CRL.
    assert!(series["ssp_policy_generation"] >= 1.0);
    assert!(series.keys().any(|k| k.starts_with("ssp_build_info{")));
    assert!(series["ssp_certificate_expiry_timestamp_seconds{cert=\"server\"}"] > 0.0);
    assert!(series["ssp_crl_next_update_timestamp_seconds{crl=\"ca.crl\"}"] > 1.0e9);
}
