//! Protocol edges found by real clients: the request that is checked is the request that is forwarded, and every
//! connection ends cleanly. Where the behaviour lives in connection handling, the real `ssp serve` binary runs;
//! clients are raw TLS sockets, hyper, curl and openssl. Loopback only, every wait bounded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a failed test"
)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

/// The head of a valid metadata request for `w`'s provider, without the final blank line, so that a test can add
/// fields of its own.
fn request_head(url: &str, method: &str, extra: &str) -> String {
    let path = format!("/{url}/fhir/metadata");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: ssp.dev.localhost\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\n\
         Ssp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nAuthorization: {}\r\n{extra}",
        bearer(&claims(&audience(&path), METADATA))
    )
}

/// Reads until the server closes the connection (close_notify or EOF); returns what arrived and how it ended.
async fn read_to_close(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (String, Result<(), String>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Err(e.to_string()),
                );
            }
        }
    }
}

/// `ssp serve` with its operational log in a file, and its admin listener on a known port.
struct Logged {
    served: Served,
    log: PathBuf,
    admin: SocketAddr,
}

impl Logged {
    async fn start(pki: &Pki, provider: SocketAddr, mut setup: Setup) -> Self {
        let admin = closed_port().await;
        setup.admin = admin.to_string();
        let log = pki.dir.path().join("ssp.log");
        let file = std::fs::File::create(&log).unwrap();
        let served = serve_setup(pki, provider, &setup, &[], file.into()).await;
        Self { served, log, admin }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log holds `text`.
    async fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self) -> String {
        metrics_text(self.admin).await
    }
}

/// A CRL from the PKI's CA with this nextUpdate, revoking `revoked` (certificate stems), written to `name`.
fn write_crl(
    pki: &Pki,
    name: &str,
    next_update: time::OffsetDateTime,
    revoked: &[&str],
) -> PathBuf {
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let revoked_certs = revoked
        .iter()
        .map(|stem| {
            let der = ssp::tls::load_certs("c", &pki.path(&format!("{stem}.crt"))).unwrap();
            let (_, x509) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
            rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(x509.raw_serial()),
                revocation_time: next_update - time::Duration::days(30),
                reason_code: None,
                invalidity_date: None,
            }
        })
        .collect();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: next_update - time::Duration::days(30),
        next_update,
        crl_number: rcgen::SerialNumber::from(7u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let path = pki.path(name);
    std::fs::write(&path, crl.pem().unwrap()).unwrap();
    path
}

/// `ssp check-config` on a config written for `setup`: exit code, and stdout and stderr together.
async fn check_config(pki: &Pki, provider: SocketAddr, setup: &Setup) -> (i32, String) {
    let config = write_config(
        pki,
        provider,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        setup,
    );
    ssp_cmd(&["check-config", "--config", config.to_str().unwrap()])
}

/// A TLS handshake (and for TLS 1.3 the first read, where a refused client certificate shows) with a fresh client
/// config, so that no session is resumed.
async fn handshake(pki: &Pki, stem: &str, addr: SocketAddr) -> Result<(), String> {
    let consumer = Consumer::new(pki, Some(stem), addr, false);
    let sender = consumer.connect().await;
    let mut sender = sender?;
    let req = ssp_request(Method::GET, "/https://nowhere.invalid/gp", METADATA)
        .body(empty())
        .unwrap();
    sender.send(req).await.map(|_| ())
}

// ---------------------------------------------------------------------------------------------------------------
// 1. What `Connection` names is removed before the checks.

/// Fields named by `Connection` (any case, any position, several `Connection` fields) are gone before check 2:
/// the check that misses its field refuses, and nothing reaches the provider.
#[tokio::test]
async fn fields_named_by_connection_are_removed_before_the_checks() {
    let w = World::start().await;
    let cases = [
        (
            "Connection: Ssp-TraceID, Ssp-From, Ssp-To, Ssp-InteractionID, Authorization\r\n",
            "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
        ),
        (
            "Connection: keep-alive\r\nConnection: x-other, AUTHORIZATION\r\n",
            "INVALID_JWT_MISSING_TOKEN",
        ),
        (
            "Connection: ssp-to ,  te\r\n",
            "MISSING_OR_INVALID_HEADER_Ssp-To",
        ),
        (
            "Connection: close, sSp-InteractionId\r\n",
            "MISSING_OR_INVALID_HEADER_Ssp-InteractionID",
        ),
    ];
    for (i, (connection, text)) in cases.iter().enumerate() {
        let mut tls = w.consumer("consumer").tls().await;
        let head = request_head(&w.url, "GET", connection) + "Connection: close\r\n\r\n";
        tls.write_all(head.as_bytes()).await.unwrap();
        let (answer, _) = within("refusal", read_to_close(&mut tls)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "case {i}: {answer}");
        assert!(
            answer.contains(&format!("\"diagnostics\":\"{text}\"")),
            "case {i}: {answer}"
        );
    }
    assert!(w.provider.seen().is_empty(), "the provider was reached");
    let records = w.records(2 * cases.len()).await;
    for record in records.iter().filter(|r| r["kind"] == "request") {
        assert_eq!(record["decision"], "deny", "{record}");
    }
}

/// An HTTP/2 consumer's split `cookie` fields reach the HTTP/1.1 provider as one field joined with `; `.
#[tokio::test]
async fn http2_cookie_fields_reach_the_provider_as_one() {
    let w = World::start().await;
    let consumer = Consumer::new(&w.pki, Some("consumer"), w.proxy.addr, true);
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(empty())
        .unwrap();
    let response = within("h2", consumer.send(req)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = w.provider.seen();
    let cookies: Vec<_> = seen[0].headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Silent and idle connections.

/// With `max_connections = 3`, three certified connections that send nothing are closed after
/// `header_read_timeout`, and a fourth consumer is then served.
#[tokio::test]
async fn silent_connections_are_closed_and_do_not_lock_others_out() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            header_read_timeout: "2s",
            max_connections: 3,
            ..Setup::default()
        },
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(consumer.tls().await);
    }
    // A fourth is served once the silent ones are gone (it waits in the backlog until then).
    let url = endpoint_url(provider.addr);
    let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
        .body(empty())
        .unwrap();
    let answer = within("fourth consumer", consumer.fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Each silent connection was closed by ssp (close_notify or EOF), not left open.
    for mut tls in silent {
        let (got, _) = within("silent close", read_to_close(&mut tls)).await;
        assert_eq!(got, "");
    }
}

/// An HTTP/2 client that sends its preface and SETTINGS, then nothing (it never acknowledges, never answers the
/// GOAWAY's PING): dropped 5 s after its idle GOAWAY, so three of them cannot hold `max_connections = 3`.
#[tokio::test]
async fn a_silent_http2_client_is_dropped_after_its_goaway() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            max_connections: 3,
            extra_server: "http2_idle_timeout = \"2s\"".into(),
            ..Setup::default()
        },
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let h2 = Consumer::new(&pki, Some("consumer"), served.addr, true);
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut tls = h2.tls().await;
        // The connection preface, then an empty SETTINGS frame (RFC 9113 section 3.4).
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        silent.push(tls);
    }
    let url = endpoint_url(provider.addr);
    let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
        .body(empty())
        .unwrap();
    let h1 = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let answer = within("fourth consumer", h1.fetch(req)).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    for mut tls in silent {
        let (got, _) = within("dropped", read_to_close(&mut tls)).await;
        assert!(!got.is_empty(), "no GOAWAY or SETTINGS before the close");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(6) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
}

/// Between requests an HTTP/1.1 keep-alive connection is bounded by `header_read_timeout`; an HTTP/2 connection
/// with no open stream by `http2_idle_timeout` (GOAWAY, then close).
#[tokio::test]
async fn idle_connections_are_closed_after_their_timeout() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            header_read_timeout: "2s",
            extra_server: "http2_idle_timeout = \"3s\"".into(),
            ..Setup::default()
        },
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let url = endpoint_url(provider.addr);
    for (h2, bound) in [(false, 2.0), (true, 3.0)] {
        let consumer = Consumer::new(&pki, Some("consumer"), served.addr, h2);
        let tls = consumer.tls().await;
        let io = hyper_util::rt::TokioIo::new(tls);
        let ended: tokio::task::JoinHandle<Instant>;
        let mut sender = if h2 {
            let (s, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            ended = tokio::spawn(async move {
                let _ = conn.await;
                Instant::now()
            });
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            ended = tokio::spawn(async move {
                let _ = conn.await;
                Instant::now()
            });
            Sender::H1(s)
        };
        for _ in 0..2 {
            let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
                .body(empty())
                .unwrap();
            let response = within("request", sender.send(req)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            drain(response.into_body()).await.unwrap();
        }
        let idle_from = Instant::now();
        let closed_at = within("idle close", ended).await.unwrap();
        let idle = closed_at.duration_since(idle_from).as_secs_f64();
        assert!(
            idle >= bound - 0.5 && idle < bound + 3.0,
            "h2 {h2}: closed after {idle} s"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Stale CRLs.

/// A CRL past its nextUpdate: check-config names it, the proxy logs it at start, `/metrics` shows its nextUpdate,
/// and a handshake whose revocation status rests on it is refused (fail closed).
#[tokio::test]
async fn an_expired_crl_is_named_and_refuses_handshakes() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let feb_2020 = time::macros::datetime!(2020-02-01 00:00 UTC);
    write_crl(&pki, "stale.crl", feb_2020, &[]);
    let setup = Setup {
        crl: "certs/stale.crl",
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("stale.crl: CRL expired (nextUpdate 2020-02-01T00:00:00Z)"),
        "{text}"
    );

    let ssp = Logged::start(&pki, provider.addr, setup).await;
    ssp.wait_for_log("stale.crl: CRL expired").await;
    let refused = handshake(&pki, "consumer", ssp.served.addr).await;
    assert!(
        refused.is_err(),
        "a handshake resting on a stale CRL completed"
    );
    let metrics = ssp.metrics().await;
    assert!(
        metrics.contains("ssp_crl_next_update_timestamp_seconds{crl=\"stale.crl\"} 1580515200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"crl_expired\"} 1"),
        "{metrics}"
    );
}

/// `server.crl_expired = "allow"`: check-config passes with a warning, the proxy serves and says so at error, in
/// a log without colour codes (stderr is not a terminal).
#[tokio::test]
async fn crl_expired_allow_keeps_serving_loudly() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    write_crl(
        &pki,
        "stale.crl",
        time::macros::datetime!(2020-02-01 00:00 UTC),
        &[],
    );
    let setup = Setup {
        crl: "certs/stale.crl",
        extra_server: "crl_expired = \"allow\"".into(),
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("warning: server.crl:") && text.contains("server.crl_expired = \"allow\""),
        "{text}"
    );
    let ssp = Logged::start(&pki, provider.addr, setup).await;
    let log = ssp.wait_for_log("stale CRL trusted").await;
    assert!(log.contains("ERROR"), "{log}");
    // Not a terminal (a file here, the journal under systemd): no colour codes.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    handshake(&pki, "consumer", ssp.served.addr).await.unwrap();
}

/// A CRL within 24 hours of its nextUpdate is a check-config warning; once it passes while the proxy runs, the
/// proxy logs it and refuses new handshakes that rest on it.
#[tokio::test]
async fn a_crl_expiring_while_running_is_logged_and_enforced() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    write_crl(&pki, "short.crl", soon, &["consumer-revoked"]);
    let setup = Setup {
        crl: "certs/short.crl",
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is within 24 hours"), "{text}");
    let ssp = Logged::start(&pki, provider.addr, setup).await;
    handshake(&pki, "consumer", ssp.served.addr).await.unwrap();
    assert!(
        handshake(&pki, "consumer-revoked", ssp.served.addr)
            .await
            .is_err()
    );
    ssp.wait_for_log("CRL expired while running").await;
    assert!(handshake(&pki, "consumer", ssp.served.addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// 4 and 6. Closing with a body (or a head) still arriving.

/// A refused upload of 1 MiB and 5 MiB, written whole before the answer is read (as python requests does): the
/// client reads the 403, not a reset, every time.
#[tokio::test]
async fn a_refused_upload_gets_its_answer_not_a_reset() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = endpoint_url(provider.addr);
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    // (size, pause between 64 KiB chunks): at full speed, and on a slow link (3 MiB at about 1 MiB/s, longer than
    // the first version's 2 s discard bound).
    let rounds = [
        (1usize << 20, 0u64),
        (5 << 20, 0),
        (1 << 20, 0),
        (5 << 20, 0),
        (5 << 20, 0),
        (3 << 20, 60),
    ];
    for (round, (size, pause_ms)) in rounds.into_iter().enumerate() {
        let tls = consumer.tls().await;
        // Check 6 refuses: this interaction is not one the sender is accredited for.
        let path = format!("/{url}/fhir/Appointment/1");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: ssp.dev.localhost\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\n\
             Ssp-To: {TO}\r\nSsp-InteractionID: {APPOINTMENT}\r\nAuthorization: {}\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: {size}\r\n\r\n",
            bearer(&claims(&audience(&path), APPOINTMENT))
        );
        // As python requests does: the whole body is written before anything is read, so the answer waits in
        // the client's receive buffer, where a reset from the server would destroy it.
        let mut tls = tls;
        let written = within("upload", async {
            tls.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..size / chunk.len() {
                tls.write_all(&chunk).await?;
                if pause_ms > 0 {
                    tls.flush().await?;
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                }
            }
            tls.flush().await
        })
        .await;
        assert!(
            written.is_ok(),
            "round {round} ({size} B): the upload broke: {written:?}"
        );
        let mut got = Vec::new();
        let ended = within("answer", tls.read_to_end(&mut got)).await;
        let answer = String::from_utf8_lossy(&got);
        assert!(
            ended.is_ok(),
            "round {round} ({size} B): {ended:?} after {answer:?}"
        );
        assert!(
            answer.starts_with("HTTP/1.1 403 "),
            "round {round}: {answer}"
        );
        assert!(
            answer.contains("ASID_CHECK_FAILED_MESSAGESENDER_"),
            "round {round}: {answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
}

/// A 200 KB (and a 1 MB) `Authorization` field: 431 with `Connection: close`, delivered before the close; also
/// to curl, which sends only the first 128 KiB of such a head and then waits for an answer.
#[tokio::test]
async fn a_huge_request_head_gets_431() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    // 200 KB reaches the proxy's own limit check; 1 MB is past hyper's read buffer, which answers a bare 431.
    for size in [200_000, 200_000, 1_000_000, 1_000_000] {
        let tls = consumer.tls().await;
        let head = format!(
            "GET /https://x/gp HTTP/1.1\r\nHost: ssp.dev.localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            "a".repeat(size)
        );
        let (mut read, mut write) = tokio::io::split(tls);
        let writer = tokio::spawn(async move { write.write_all(head.as_bytes()).await });
        let mut got = Vec::new();
        let ended = within("431", read.read_to_end(&mut got)).await;
        let answer = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(ended.is_ok(), "{size}: {ended:?} after {answer:?}");
        assert!(answer.starts_with("http/1.1 431 "), "{size}: {answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        let _ = within("writer", writer).await;
    }
    let header = pki.dir.path().join("big-header.txt");
    std::fs::write(
        &header,
        format!("Authorization: Bearer {}\n", "a".repeat(200_000)),
    )
    .unwrap();
    let started = Instant::now();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
        ])
        .arg(pki.path("ca.crt"))
        .arg("--cert")
        .arg(pki.path("consumer.crt"))
        .arg("--key")
        .arg(pki.path("consumer.key"))
        .arg("-H")
        .arg(format!("@{}", header.display()))
        .arg(format!(
            "https://127.0.0.1:{}/https://x/gp",
            served.addr.port()
        ))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        code,
        "431",
        "curl: {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 5. The alert of a refused handshake reaches the client.

/// curl over TLS 1.3 with a revoked, an expired and no client certificate names the alert every time.
#[tokio::test]
async fn curl_names_the_alert_of_a_refused_handshake() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = format!("https://127.0.0.1:{}/", served.addr.port());
    let ca = pki.path("ca.crt");
    let cases: [(Option<&str>, &str); 3] = [
        (Some("consumer-revoked"), "certificate revoked"),
        (Some("consumer-expired"), "certificate expired"),
        (None, "certificate required"),
    ];
    for (stem, alert) in cases {
        for round in 0..5 {
            let mut cmd = std::process::Command::new("curl");
            cmd.args(["-sS", "--tlsv1.3", "--max-time", "10", "--cacert"])
                .arg(&ca);
            if let Some(stem) = stem {
                cmd.arg("--cert")
                    .arg(pki.path(&format!("{stem}.crt")))
                    .arg("--key")
                    .arg(pki.path(&format!("{stem}.key")));
            }
            let out = cmd.arg(&url).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(stderr.contains(alert), "{stem:?} round {round}: {stderr}");
        }
    }
}

/// The alerts that would mislead a consumer's support staff are plain: a client certificate not valid yet and a
/// handshake refused for a stale CRL both get `certificate_unknown` (not `certificate_expired`, not `unknown_ca`),
/// while the metrics name the real cause.
#[tokio::test]
async fn not_yet_valid_and_stale_crl_refusals_send_certificate_unknown() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(400);
    params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(pki.path("consumer-future.crt"), leaf.pem()).unwrap();
    std::fs::write(pki.path("consumer-future.key"), leaf_key.serialize_pem()).unwrap();
    write_crl(
        &pki,
        "stale.crl",
        time::macros::datetime!(2020-02-01 00:00 UTC),
        &[],
    );
    let ssp = Logged::start(
        &pki,
        provider.addr,
        Setup {
            crl: "certs/stale.crl",
            ..Setup::default()
        },
    )
    .await;
    let url = format!("https://127.0.0.1:{}/", ssp.served.addr.port());
    for (stem, misleading) in [
        ("consumer-future", "certificate expired"),
        ("consumer", "unknown ca"),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--tlsv1.3", "--max-time", "10", "--cacert"])
            .arg(pki.path("ca.crt"))
            .arg("--cert")
            .arg(pki.path(&format!("{stem}.crt")))
            .arg("--key")
            .arg(pki.path(&format!("{stem}.key")))
            .arg(&url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        assert!(!out.status.success());
        assert!(stderr.contains("certificate unknown"), "{stem}: {stderr}");
        assert!(!stderr.contains(misleading), "{stem}: {stderr}");
    }
    // The client may see the alert before the proxy has counted the failure: wait for the count.
    let deadline = Instant::now() + STEP;
    loop {
        let metrics = ssp.metrics().await;
        let counted = metrics
            .contains("ssp_tls_handshake_failures_total{reason=\"certificate_not_yet_valid\"} 1")
            && metrics.contains("ssp_tls_handshake_failures_total{reason=\"crl_expired\"} 1");
        if counted {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 7. A stale pooled provider connection.

/// How the stale provider treats a kept-alive connection once it has answered.
#[derive(Clone, Copy)]
enum Stale {
    /// Closes 3 ms after answering.
    CloseAfter3ms,
    /// Closes as soon as the next request's first bytes arrive, without reading them.
    CloseOnNextRequest,
}

/// A TLS MA provider on loopback that serves each connection, once its handshake is done, with `serve`; counts
/// connections. What the provider does is the test's; the listening, accepting and handshakes are the same.
async fn raw_provider<F, Fut>(pki: &Pki, serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tls = ssp::demo::provider_tls(
        &pki.path("provider.crt"),
        &pki.path("provider.key"),
        &pki.ca(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let (c, serve) = (Arc::clone(&connections), Arc::new(serve));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, serve) = (acceptor.clone(), Arc::clone(&serve));
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    (addr, connections)
}

/// Reads a request head (through its blank line) from a raw provider's connection; `None` when it closes first.
async fn read_head(
    tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 8192];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// The World with one more endpoint, ASID `to`, at `https://localhost:<port of addr>/gp`, served by a raw provider
/// at `addr`, and an agreement from `FROM` to it; returns the World and the endpoint's URL.
async fn world_with_raw_provider(
    pki: Pki,
    addr: SocketAddr,
    to: &str,
    tag: &str,
) -> (World, String) {
    let port = addr.port();
    let url = format!("https://localhost:{port}/gp");
    let w = World::start_in(
        pki,
        Setup {
            extra_resolve: format!("\"localhost:{port}\" = \"{addr}\"\n"),
            extra_policy: format!(
                "\n[[endpoint]]\nasid = \"{to}\"\nparty_key = \"{tag}-1\"\ncpa_id = \"{tag}1\"\nods = \"{tag}1\"\n\
                 url = \"{url}\"\ninteractions = [\"{METADATA}\"]\n\n[[agreement]]\nid = \"DSA-{tag}\"\nfrom = \"{FROM}\"\n\
                 to = \"{to}\"\ninteractions = [\"*\"]\n"
            ),
            ..Setup::default()
        },
    )
    .await;
    (w, url)
}

/// A metadata request to the raw provider's endpoint `url` (ASID `to`), its trace id ending in `trace`.
fn request_to(
    url: &str,
    to: &str,
    method: Method,
    body: TestBody,
    trace: usize,
) -> http::Request<TestBody> {
    let mut req = ssp_request(method, &format!("/{url}/fhir/metadata"), METADATA)
        .body(body)
        .unwrap();
    req.headers_mut().insert("ssp-to", to.parse().unwrap());
    req.headers_mut().insert(
        "ssp-traceid",
        format!("00000000-0000-4000-8000-{trace:012}")
            .parse()
            .unwrap(),
    );
    req
}

/// A TLS MA provider that answers one request per connection with 200 and a keep-alive response, then closes
/// per `mode`. Counts connections and answered requests.
async fn stale_provider(
    pki: &Pki,
    mode: Stale,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&answered);
    let (addr, connections) = raw_provider(pki, move |mut tls| {
        let a = Arc::clone(&a);
        async move {
            if read_head(&mut tls).await.is_none() {
                return;
            }
            let body = b"{\"resourceType\":\"CapabilityStatement\"}";
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if tls.write_all(answer.as_bytes()).await.is_err() || tls.write_all(body).await.is_err() {
                return;
            }
            let _ = tls.flush().await;
            a.fetch_add(1, Ordering::SeqCst);
            match mode {
                Stale::CloseAfter3ms => tokio::time::sleep(Duration::from_millis(3)).await,
                Stale::CloseOnNextRequest => {
                    let _ = tls.get_mut().0.readable().await;
                }
            }
            // Unread bytes make this close a reset, as a real server's idle close racing a request can.
            drop(tls);
        }
    })
    .await;
    (addr, connections, answered)
}

/// The stale provider's endpoint ASID.
const TO_STALE: &str = "918999198997";

/// The World with one more endpoint, `TO_STALE`, served by a stale provider.
async fn stale_world(mode: Stale) -> (World, String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let pki = Pki::generate();
    let (addr, connections, answered) = stale_provider(&pki, mode).await;
    let (w, url) = world_with_raw_provider(pki, addr, TO_STALE, "S").await;
    (w, url, connections, answered)
}

fn stale_request(
    url: &str,
    method: Method,
    body: TestBody,
    trace: usize,
) -> http::Request<TestBody> {
    request_to(url, TO_STALE, method, body, trace)
}

/// Twenty GETs back to back on one consumer connection, against a provider that closes each keep-alive
/// connection after its first answer: every one is answered 200, and those that met a stale pooled connection
/// say `retried` in their response record.
#[tokio::test]
async fn idempotent_requests_on_a_stale_pooled_connection_are_retried_once() {
    for mode in [Stale::CloseOnNextRequest, Stale::CloseAfter3ms] {
        let (w, url, _, answered) = stale_world(mode).await;
        let mut sender = w.consumer("consumer").connect().await.unwrap();
        for i in 0..20 {
            let response = within(
                "get",
                sender.send(stale_request(&url, Method::GET, empty(), i)),
            )
            .await
            .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "request {i}");
            drain(response.into_body()).await.unwrap();
        }
        assert_eq!(answered.load(Ordering::SeqCst), 20);
        let records = w.records(40).await;
        let responses: Vec<_> = records.iter().filter(|r| r["kind"] == "response").collect();
        assert!(
            responses
                .iter()
                .all(|r| r["status"] == 200 && r["outcome"] == "ok")
        );
        let retried = responses.iter().filter(|r| r["retried"] == true).count();
        if matches!(mode, Stale::CloseOnNextRequest) {
            // Every request after the first on a pooled connection met a stale one.
            assert!(retried >= 9, "{retried} retried: {responses:?}");
        } else {
            assert!(retried <= 19, "{responses:?}");
        }
    }
}

/// A request with a body (POST), or one whose method is not idempotent, is not retried: 502, recorded as an
/// upstream error, and the provider answered nothing more.
#[tokio::test]
async fn a_request_with_a_body_is_not_retried() {
    let (w, url, connections, answered) = stale_world(Stale::CloseOnNextRequest).await;
    let mut sender = w.consumer("consumer").connect().await.unwrap();
    let first = within(
        "get",
        sender.send(stale_request(&url, Method::GET, empty(), 1)),
    )
    .await
    .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    drain(first.into_body()).await.unwrap();
    let post = within(
        "post",
        sender.send(stale_request(&url, Method::POST, full("{\"a\":1}"), 2)),
    )
    .await
    .unwrap();
    let answer = Answer::read(post).await.unwrap();
    answer.assert_outcome(
        502,
        "transient",
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{url}/fhir/metadata"),
    );
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "a retry connection was opened"
    );
    let records = w.records(4).await;
    let last = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "response")
        .unwrap();
    assert_eq!(last["outcome"], "upstream_error", "{last}");
    assert!(last.get("retried").is_none(), "{last}");
}

// ---------------------------------------------------------------------------------------------------------------
// 10. CA names too large for a handshake.

/// 450 CAs with long names (more than 64 KiB of names): check-config refuses it with the size, unless
/// `server.client_ca_hints = false`, with which a consumer completes its handshake.
#[tokio::test]
async fn client_ca_names_too_large_for_one_message_are_refused_or_not_sent() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let mut bundle = std::fs::read_to_string(pki.path("ca.crt")).unwrap();
    let padding = "x".repeat(150);
    for i in 0..450 {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("padding CA {i} {padding}"),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        bundle.push_str(&params.self_signed(&key).unwrap().pem());
    }
    std::fs::write(pki.path("many-cas.crt"), bundle).unwrap();
    let write = |extra: &str, admin_port: SocketAddr| {
        let setup = Setup {
            extra_server: extra.into(),
            ..Setup::default()
        };
        let path = write_config(
            &pki,
            provider.addr,
            admin_port,
            "127.0.0.1:0".parse().unwrap(),
            &setup,
        );
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "client_ca = [\"certs/ca.crt\"]",
            "client_ca = [\"certs/many-cas.crt\"]",
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let down = closed_port().await;
    let config = write("", down);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("server.client_ca: the names of its 451 CAs take"),
        "{text}"
    );
    assert!(text.contains("server.client_ca_hints = false"), "{text}");

    let config = write("client_ca_hints = false", down);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let served_config = ssp::config::Config::load(&config).unwrap();
    let tls = ssp::tls::server_config(&served_config.server).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.shutdown().await.unwrap();
    });
    // OpenSSL, the client that failed on the oversized CertificateRequest.
    let out = tokio::task::spawn_blocking({
        let (cert, key, ca) = (
            pki.path("consumer.crt"),
            pki.path("consumer.key"),
            pki.path("ca.crt"),
        );
        move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-quiet",
                    "-verify_return_error",
                ])
                .arg("-cert")
                .arg(cert)
                .arg("-key")
                .arg(key)
                .arg("-CAfile")
                .arg(ca)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The window just under 64 KiB of names: names that fit the 16-bit list but not TLS 1.3's extensions block (where
/// rustls would panic on every handshake) or a rustls client's 64 KiB flight buffer are refused; names just under
/// ssp's bound complete a TLS 1.3 handshake with a rustls client.
#[tokio::test]
async fn client_ca_names_near_the_limit() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let dn_bytes = |pem: &str| -> usize {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        2 + x509.subject().as_raw().len()
    };
    let dev_ca = std::fs::read_to_string(pki.path("ca.crt")).unwrap();
    let padding = "y".repeat(200);
    let mut extra: Vec<String> = Vec::new();
    let (mut fits, mut window) = (None, None);
    let mut total = dn_bytes(&dev_ca);
    for i in 0.. {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("window CA {i} {padding}"),
        );
        let pem = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let size = dn_bytes(&pem);
        if fits.is_none() && total + size > ssp::tls::MAX_CA_HINT_BYTES {
            fits = Some((dev_ca.clone() + extra.concat().as_str(), total));
        }
        extra.push(pem);
        total += size;
        if window.is_none() && total > ssp::tls::MAX_CA_HINT_BYTES {
            window = Some((dev_ca.clone() + extra.concat().as_str(), total));
        }
        // The size that made rustls panic in TLS 1.3: within the 16-bit list, not within the extensions block.
        if total > 65_100 {
            break;
        }
    }
    let panics = (dev_ca.clone() + extra.concat().as_str(), total);
    let (fits, fits_total) = fits.unwrap();
    let (window, window_total) = window.unwrap();
    assert!(
        fits_total > 61_000 && window_total < 62_000,
        "{fits_total} {window_total}"
    );
    assert!(panics.1 <= 65_535, "{}", panics.1);
    let with_bundle = |name: &str, bundle: &str| {
        std::fs::write(pki.path(name), bundle).unwrap();
        let config = pki.dir.path().join("ssp.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "client_ca = [\"certs/ca.crt\"]",
            &format!("client_ca = [\"certs/{name}\"]"),
        );
        std::fs::write(&config, text).unwrap();
        config
    };
    write_config(
        &pki,
        provider.addr,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        &Setup::default(),
    );
    for (name, (bundle, bytes)) in [
        ("window.crt", (window, window_total)),
        ("panics.crt", panics),
    ] {
        write_config(
            &pki,
            provider.addr,
            closed_port().await,
            "127.0.0.1:0".parse().unwrap(),
            &Setup::default(),
        );
        let config = with_bundle(name, &bundle);
        let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 64, "{bytes} bytes: {text}");
        assert!(text.contains(&format!("take {bytes} bytes")), "{text}");
    }

    // Just under the bound: served, and a TLS 1.3 handshake asks for a certificate and completes.
    let addr = closed_port().await;
    write_config(
        &pki,
        provider.addr,
        closed_port().await,
        addr,
        &Setup::default(),
    );
    let config = with_bundle("fits.crt", &fits);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{fits_total} bytes: {text}");
    let mut child = std::process::Command::new(ssp_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = handshake(&pki, "consumer", addr).await;
    let _ = child.kill();
    let _ = child.wait();
    // The request itself is refused (check 3: no such target), but only after a completed handshake.
    assert!(got.is_ok(), "{fits_total} bytes of names: {got:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Smaller edges.

/// The server's cipher-suite order wins over the client's.
#[tokio::test]
async fn the_servers_cipher_suite_order_wins() {
    let w = World::start().await;
    let provider = ssp::tls::provider();
    let mut chacha_first = (*provider).clone();
    chacha_first
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("CHACHA20"));
    let roots = ssp::tls::load_roots("ca", &w.pki.ca()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(chacha_first))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            ssp::tls::load_certs("c", &w.pki.path("consumer.crt")).unwrap(),
            ssp::tls::load_key("k", &w.pki.path("consumer.key")).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(w.proxy.addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(format!("{:?}", suite.suite()), "TLS13_AES_256_GCM_SHA384");
}

/// A consumer certificate with no CN, whose DNS SAN is the registered FQDN: permitted, and the request record
/// names the SAN that check 5 matched.
#[tokio::test]
async fn a_certificate_without_cn_is_recorded_by_its_matching_san() {
    let w = World::start().await;
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(w.pki.path("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(w.pki.path("ca.crt")).unwrap(),
        key,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "no common name");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(w.pki.path("nocn.crt"), cert.pem()).unwrap();
    std::fs::write(w.pki.path("nocn.key"), leaf_key.serialize_pem()).unwrap();
    let consumer = Consumer::new(&w.pki, Some("nocn"), w.proxy.addr, false);
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    let answer = within("nocn", consumer.fetch(req)).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let records = w.records(1).await;
    assert_eq!(records[0]["fqdn"], CONSUMER_NAME, "{}", records[0]);
    assert_eq!(records[0]["peer"]["subject"], "O=no common name");
}

/// What any client can make rustls warn about (an IP address as SNI) does not reach the operator's log by default;
/// with `RUST_LOG` naming rustls it does (so the input does make rustls warn).
#[tokio::test]
async fn rustls_warnings_a_consumer_triggers_are_not_logged() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    for (rust_log, expect_warning) in [(None, false), (Some("info,rustls=warn"), true)] {
        let addr = closed_port().await;
        let config = write_config(
            &pki,
            provider.addr,
            closed_port().await,
            addr,
            &Setup::default(),
        );
        let log = pki.dir.path().join("ssp.log");
        let mut cmd = std::process::Command::new(ssp_bin());
        cmd.args(["serve", "--config"]).arg(&config);
        match rust_log {
            None => cmd.env_remove("RUST_LOG"),
            Some(v) => cmd.env("RUST_LOG", v),
        };
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + STEP;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..5 {
            let out = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    "127.0.0.1",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(!out.stdout.is_empty());
        }
        // Each refused handshake (no client certificate) is logged by ssp at info: wait for the fifth.
        let deadline = Instant::now() + STEP;
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches("TLS handshake refused").count() >= 5 || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(text.matches("TLS handshake refused").count() >= 5, "{text}");
        assert_eq!(
            text.contains("Illegal SNI"),
            expect_warning,
            "RUST_LOG {rust_log:?}: {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 11. A provider that answers before it has read the request body.

/// A TLS MA provider that answers every request at once from its head: 413 (keep-alive) to one with a body, which
/// it never reads, and 200 to one without. Counts connections.
async fn early_provider(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    raw_provider(pki, |mut tls| async move {
        while let Some(head) = read_head(&mut tls).await {
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let with_body = text.contains("content-length") || text.contains("transfer-encoding");
            let answer: &[u8] = if with_body {
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}"
            };
            if tls.write_all(answer).await.is_err() {
                return;
            }
            let _ = tls.flush().await;
            if with_body {
                // The body is never read: the connection stays open, its unread bytes pile up.
                std::future::pending::<()>().await;
            }
        }
    })
    .await
}

/// A provider answers an upload before reading it: the consumer gets that answer, and the provider connection,
/// which cannot carry another request, is not pooled: the next request is answered on a new connection.
#[tokio::test]
async fn a_connection_left_with_an_unsent_body_is_not_reused() {
    const TO_EARLY: &str = "918999198996";
    let pki = Pki::generate();
    let (addr, connections) = early_provider(&pki).await;
    let (w, url) = world_with_raw_provider(pki, addr, TO_EARLY, "E").await;
    let request = |method, body, trace| request_to(&url, TO_EARLY, method, body, trace);
    // 8 MiB: more than the socket buffers between ssp and the provider hold.
    let mut sender = w.consumer("consumer").connect().await.unwrap();
    let upload = within(
        "upload answered early",
        sender.send(request(Method::POST, full(vec![b'x'; 8 << 20]), 1)),
    )
    .await
    .unwrap();
    assert_eq!(upload.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The uploading consumer stays connected, its client still sending: a connection left to the pool would keep
    // pulling its body into a provider that does not read, and the next request taking it would wait until
    // `upstream.connect_timeout` and get 502.
    let _uploading = sender;
    let mut next = w.consumer("consumer").connect().await.unwrap();
    let get = within("next request", next.send(request(Method::GET, empty(), 2)))
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "one connection per exchange"
    );
}

/// A TLS MA provider that answers every request with 200, `Connection: close` and a body delimited by the end of
/// the connection (5,000 bytes), then drops the TCP connection without a TLS close_notify.
async fn truncating_provider(pki: &Pki) -> SocketAddr {
    let (addr, _) = raw_provider(pki, |mut tls| async move {
        if read_head(&mut tls).await.is_none() {
            return;
        }
        let mut answer =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b'z', 5000));
        let _ = tls.write_all(&answer).await;
        let _ = tls.flush().await;
        // No close_notify: the TCP connection just ends.
        let (tcp, _) = tls.into_inner();
        drop(tcp);
    })
    .await;
    addr
}

/// A response delimited by the end of its connection, which ends without TLS close_notify: the consumer gets the
/// head and every byte that arrived, then a broken stream (it cannot know the body was complete), over HTTP/1.1
/// and HTTP/2; the record says `upstream_error` with the bytes passed on.
#[tokio::test]
async fn a_body_cut_without_close_notify_arrives_whole_then_breaks() {
    const TO_CUT: &str = "918999198995";
    let pki = Pki::generate();
    let addr = truncating_provider(&pki).await;
    let (w, url) = world_with_raw_provider(pki, addr, TO_CUT, "C").await;
    for (round, h2) in [(0usize, false), (1, true), (2, false), (3, true)] {
        let consumer = Consumer::new(&w.pki, Some("consumer"), w.proxy.addr, h2);
        let mut sender = consumer.connect().await.unwrap();
        let req = request_to(&url, TO_CUT, Method::GET, empty(), round);
        let response = within("cut response", sender.send(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let mut body = response.into_body();
        let (mut got, mut broken) = (0usize, false);
        while let Some(frame) = within("frame", body.frame()).await {
            match frame {
                Ok(frame) => got += frame.data_ref().map_or(0, |d| d.len()),
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        assert_eq!((got, broken), (5000, true), "round {round} (h2: {h2})");
    }
}
