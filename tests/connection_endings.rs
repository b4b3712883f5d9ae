//! How consumer connections end: silent and idle ones are closed on time without locking others out, and a
//! connection ssp closes while a body or a head is still arriving gets its answer, not a reset. The real
//! `ssp serve` binary where the behaviour is in connection handling; raw TLS sockets, hyper and curl as clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// Silent and idle connections.

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
        ChildLog::Null,
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
        ChildLog::Null,
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
        ChildLog::Null,
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
// A consumer that goes away while its request is handled.

/// The records of `trace` in the log at `dir` once there are at least `n` of them (polled every 20 ms).
async fn records_of(dir: &std::path::Path, trace: &str, n: usize) -> Vec<serde_json::Value> {
    loop {
        let records = ssp::audit::query(
            dir,
            &ssp::audit::Filter {
                trace_id: Some(trace.to_owned()),
                ..ssp::audit::Filter::default()
            },
        )
        .unwrap_or_default();
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1.1 consumer that closes its connection while its request waits for the provider (which never
/// answers) is noticed at once, though hyper does not read the connection while a request is handled
/// (`half_close`): the exchange ends `client_closed` within a second or two, not at the provider's
/// `response_timeout` (a minute here), and the proxy serves on. Both ways of going: a plain close, and a close after
/// close_notify.
#[tokio::test]
async fn a_consumer_gone_while_the_provider_is_silent_is_noticed_at_once() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            response_timeout: "60s",
            ..Setup::default()
        },
        &[],
        ChildLog::Null,
    )
    .await;
    let url = endpoint_url(provider.addr);
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let dir = pki.dir.path().join("data/audit");
    for (n, notify) in [(1u32, false), (2, true)] {
        let mut tls = consumer.tls().await;
        let path = format!("/{url}/fhir/silent");
        let trace = trace_id(n);
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: ssp.dev.localhost\r\nSsp-TraceID: {trace}\r\nSsp-From: {FROM}\r\n\
             Ssp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nAuthorization: {}\r\n\r\n",
            bearer(&claims(&audience(&path), METADATA))
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        // The request has reached the provider: the proxy is waiting for its answer.
        let seen = n as usize;
        let deadline = Instant::now() + STEP;
        while provider.seen().len() < seen {
            assert!(
                Instant::now() < deadline,
                "the provider never saw request {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gone = Instant::now();
        if notify {
            tls.shutdown().await.unwrap();
        }
        drop(tls);
        let records = within("client_closed", records_of(&dir, &trace, 2)).await;
        let noticed = gone.elapsed();
        assert_eq!(records[1]["kind"], "response", "{records:#?}");
        assert_eq!(records[1]["outcome"], "client_closed", "{records:#?}");
        assert!(
            noticed < Duration::from_secs(5),
            "request {n}: noticed after {noticed:?}"
        );
    }
    // The proxy serves on.
    let a = within(
        "after",
        consumer.fetch(traced_get(&url, "/fhir/metadata", &trace_id(3))),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    drop(served);
}

// ---------------------------------------------------------------------------------------------------------------
// Closing with a body (or a head) still arriving.

/// A refused upload of 1 MiB and 5 MiB, written whole before the answer is read (as python requests does): the
/// client reads the 403, not a reset, every time.
#[tokio::test]
async fn a_refused_upload_gets_its_answer_not_a_reset() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = endpoint_url(provider.addr);
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    // (size, pause between 64 KiB chunks): at full speed, and on a slow link (3 MiB at about 1 MiB/s: more than
    // 2 s of discarding, so a short discard bound would reset the connection before the answer is read).
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

/// A consumer that closes its connection part-way through its request body has left: its exchange ends
/// `client_closed` with no status (nothing was answered), and the provider, whose leg failed because the body broke
/// off, is not blamed: no `upstream failure` in the operational log and no upstream error counted. (Before, the
/// proxy answered 502 into the closed connection and recorded that status.)
#[tokio::test]
async fn a_consumer_gone_mid_body_is_recorded_client_closed_without_an_answer() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let log_path = pki.dir.path().join("child.log");
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup::default(),
        &[],
        std::fs::File::create(&log_path).unwrap().into(),
    )
    .await;
    let url = endpoint_url(provider.addr);
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let dir = pki.dir.path().join("data/audit");
    let path = format!("/{url}/fhir/upload");
    let trace = trace_id(7);
    let mut tls = consumer.tls().await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: ssp.dev.localhost\r\nSsp-TraceID: {trace}\r\nSsp-From: {FROM}\r\n\
         Ssp-To: {TO}\r\nSsp-InteractionID: {STRUCTURED}\r\nAuthorization: {}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: 5000\r\n\r\n",
        bearer(&claims(&audience(&path), STRUCTURED))
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&[b'x'; 100]).await.unwrap();
    tls.flush().await.unwrap();
    // The request record is written before anything is forwarded: from then on the body streams to the provider.
    within("the request record", records_of(&dir, &trace, 1)).await;
    drop(tls);
    let records = within("the response record", records_of(&dir, &trace, 2)).await;
    assert_eq!(records[1]["kind"], "response", "{records:#?}");
    assert_eq!(records[1]["outcome"], "client_closed", "{records:#?}");
    assert_eq!(records[1]["status"], 0, "{records:#?}");
    // The proxy serves on, and has blamed no provider.
    let after = within(
        "after",
        consumer.fetch(traced_get(&url, "/fhir/metadata", &trace_id(8))),
    )
    .await
    .unwrap();
    assert_eq!(after.status, StatusCode::OK);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("upstream failure"), "{log}");
    drop(served);
}
