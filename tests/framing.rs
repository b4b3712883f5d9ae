//! Message framing on both legs, against the real binary over loopback: what a provider sends that the consumer's
//! protocol cannot carry or would read wrongly (RFC 9112 sections 6.1, 6.3 and 9.8, RFC 9110 sections 6.2 and
//! 15), and what a consumer sends whose framing ssp cannot forward as checked (`Transfer-Encoding` lists, malformed
//! chunked bodies, `Host`). Each case asserts the consumer's answer, the audit record and what reached the provider.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::Ordering;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The real binary in front of `provider`, with its admin listener on a known port.
struct Proxied {
    pki: Pki,
    served: Served,
    admin: std::net::SocketAddr,
    url: String,
}

impl Proxied {
    async fn start(pki: Pki, provider: std::net::SocketAddr) -> Self {
        let admin = closed_port().await;
        let setup = Setup {
            response_timeout: "5s",
            admin: admin.to_string(),
            ..Setup::default()
        };
        let served = serve_setup(&pki, provider, &setup, &[], ChildLog::Null).await;
        Self {
            pki,
            served,
            admin,
            url: endpoint_url(provider),
        }
    }

    fn consumer(&self, h2: bool) -> Consumer {
        Consumer::new(&self.pki, Some("consumer"), self.served.addr, h2)
    }

    /// The response record of `trace_id`, once written.
    async fn response_record(&self, trace_id: &str) -> serde_json::Value {
        response_record(&self.pki.dir.path().join("data/audit"), trace_id).await
    }

    /// One sample of a counter from `/metrics` (0 when absent).
    async fn metric(&self, series: &str) -> u64 {
        metric_value(self.admin, series).await
    }
}

/// A request written by hand on its own TLS connection: `method` and `tail` under the endpoint, `version` on the
/// request line, the `Ssp-*` fields and a valid token, `Host` only when given, then `extra` lines (each ending in
/// CRLF), the blank line and `body`.
struct Raw<'a> {
    method: &'a str,
    tail: &'a str,
    version: &'a str,
    host: Option<&'a str>,
    extra: &'a str,
    body: &'a [u8],
}

impl<'a> Raw<'a> {
    fn get(tail: &'a str, version: &'a str) -> Self {
        Raw {
            method: "GET",
            tail,
            version,
            host: None,
            extra: "",
            body: b"",
        }
    }

    /// Sends it with `trace_id` and reads until the proxy ends the connection (see [`read_to_end`]).
    async fn send(&self, p: &Proxied, trace_id: &str) -> (Vec<u8>, std::io::Result<()>) {
        let path = format!("/{}{}", p.url, self.tail);
        let template = ssp_request(Method::GET, &path, METADATA).body(()).unwrap();
        let mut head = format!("{} {path} {}\r\n", self.method, self.version);
        if let Some(host) = self.host {
            head.push_str(&format!("Host: {host}\r\n"));
        }
        for (name, value) in template.headers() {
            let value = match name.as_str() {
                "host" => continue,
                "ssp-traceid" => trace_id,
                _ => value.to_str().unwrap(),
            };
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(self.extra);
        head.push_str("\r\n");
        let mut tls = p.consumer(false).tls().await;
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(self.body).await.unwrap();
        read_to_end(&mut tls).await
    }
}

/// Reads until the proxy ends the connection: what arrived, and how it ended (`Ok` for a TLS close_notify,
/// the error when the connection ended without one).
async fn read_to_end(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let ended = within("the proxy's answer and close", async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    (got, ended)
}

/// The status code of a raw HTTP/1.x answer.
fn status_of(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A provider's `Content-Length` beside `Transfer-Encoding: chunked` is dropped (RFC 9112 section 6.3): HTTP/1.1
/// and HTTP/2 consumers get exactly the decoded content, and the record counts what they got.
#[tokio::test]
async fn a_provider_length_beside_chunked_is_dropped() {
    let pki = Pki::generate();
    let fault = FaultProvider::for_pki(&pki).await;
    let p = Proxied::start(pki, fault.addr).await;
    for (n, h2) in [(1, false), (2, true)] {
        let id = trace_id(n);
        let response = within(
            "answer",
            p.consumer(h2).send(traced_get(&p.url, "/cl-chunked", &id)),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "h2 {h2}");
        assert!(
            response
                .headers()
                .get("content-length")
                .is_none_or(|v| v == "5"),
            "h2 {h2}: {:?}",
            response.headers()
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello", "h2 {h2}");
        let record = p.response_record(&id).await;
        assert_eq!(record["outcome"], "ok");
        assert_eq!(record["bytes_out"], 5);
    }
}

/// A provider answer the consumer's protocol cannot carry, or that would reach it as something else, is a 502
/// `ERROR_COMMUNICATING_TO_ENDPOINT_URL_...` recorded `upstream_error`, over HTTP/1.1 and HTTP/2: an unasked
/// `101`, a status outside 100 to 599, a coding under the chunks, chunked twice.
#[tokio::test]
async fn provider_framing_the_consumer_cannot_carry_is_a_502() {
    let pki = Pki::generate();
    let fault = FaultProvider::for_pki(&pki).await;
    let p = Proxied::start(pki, fault.addr).await;
    let mut n = 10;
    for tail in ["/switch", "/status-600", "/gzip-chunked", "/chunked-twice"] {
        for h2 in [false, true] {
            n += 1;
            let id = trace_id(n);
            let answer = within(tail, p.consumer(h2).fetch(traced_get(&p.url, tail, &id)))
                .await
                .unwrap();
            answer.assert_outcome(
                502,
                "transient",
                &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{}{tail}", p.url),
            );
            let record = p.response_record(&id).await;
            assert_eq!(record["outcome"], "upstream_error", "{tail} h2 {h2}");
            assert_eq!(record["status"], 502, "{tail} h2 {h2}");
        }
    }
}

/// A provider body cut short whose consumer framing cannot say so (an HTTP/1.0 consumer: delimited by the close)
/// ends the consumer's connection without TLS close_notify (RFC 9112 section 9.8), while a complete one ends with
/// it; an HTTP/1.1 consumer of an HTTP/1.0 provider is answered in HTTP/1.1, chunked, and sees the cut as an
/// incomplete body. Both are recorded `upstream_error`.
#[tokio::test]
async fn a_cut_provider_body_never_looks_complete() {
    let pki = Pki::generate();
    let fault = FaultProvider::for_pki(&pki).await;
    let p = Proxied::start(pki, fault.addr).await;
    let consumer = p.consumer(false);

    // HTTP/1.0, complete: the close ends the body, and close_notify says it is the whole of it.
    let id = trace_id(21);
    let (answer, ended) = Raw::get("/cl-chunked", "HTTP/1.0").send(&p, &id).await;
    assert_eq!(status_of(&answer), 200);
    assert!(
        answer.ends_with(b"\r\n\r\nhello"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        ended.is_ok(),
        "a complete body ends with close_notify: {ended:?}"
    );

    // HTTP/1.0, cut: no close_notify.
    let id = trace_id(22);
    let (answer, ended) = Raw::get("/http10-cut", "HTTP/1.0").send(&p, &id).await;
    assert_eq!(status_of(&answer), 200);
    let err = ended.expect_err("a cut body must not end with close_notify");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(p.response_record(&id).await["outcome"], "upstream_error");

    // HTTP/1.1 consumer of the same HTTP/1.0 provider: answered as HTTP/1.1, chunked; the body fails.
    let id = trace_id(23);
    let response = within(
        "answer",
        consumer.send(traced_get(&p.url, "/http10-cut", &id)),
    )
    .await
    .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let read = within("body", response.into_body().collect()).await;
    assert!(read.is_err(), "the consumer must see the body fail");
    assert_eq!(p.response_record(&id).await["outcome"], "upstream_error");
}

/// A request `Transfer-Encoding` other than one `chunked` never reaches the provider: a coding ssp does not
/// decode is 501 (RFC 9112 section 6.1), chunked twice is 400, each with its records; the provider sees nothing.
#[tokio::test]
async fn request_transfer_codings_other_than_chunked_are_refused() {
    let pki = Pki::generate();
    let fault = FaultProvider::for_pki(&pki).await;
    let p = Proxied::start(pki, fault.addr).await;
    let cases = [
        ("gzip, chunked", 501, "TRANSFER_CODING_NOT_IMPLEMENTED"),
        ("foo, chunked", 501, "TRANSFER_CODING_NOT_IMPLEMENTED"),
        ("chunked, chunked", 400, "INVALID_TRANSFER_ENCODING"),
    ];
    for (n, (coding, status, text)) in (31..).zip(cases) {
        let id = trace_id(n);
        let extra = format!("Transfer-Encoding: {coding}\r\nConnection: close\r\n");
        let raw = Raw {
            method: "POST",
            host: Some("ssp"),
            extra: &extra,
            body: b"5\r\nhello\r\n0\r\n\r\n",
            ..Raw::get("/upload", "HTTP/1.1")
        };
        let (answer, _) = raw.send(&p, &id).await;
        assert_eq!(status_of(&answer), status, "{coding}");
        assert!(
            String::from_utf8_lossy(&answer).contains(text),
            "{coding}: {}",
            String::from_utf8_lossy(&answer)
        );
        let record = p.response_record(&id).await;
        assert_eq!(record["outcome"], "denied", "{coding}");
        assert_eq!(record["status"], status, "{coding}");
    }
    assert_eq!(fault.requests.load(Ordering::SeqCst), 0);
}

/// A missing (HTTP/1.1), repeated or invalid `Host` is 400 `MISSING_OR_INVALID_HEADER_Host` (RFC 9112 section
/// 3.2) and is never forwarded; an HTTP/1.0 request without `Host` is served.
#[tokio::test]
async fn host_is_required_once_and_well_formed() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let p = Proxied::start(pki, provider.addr).await;
    let cases: [(&str, Option<&str>, &str, u16); 6] = [
        ("HTTP/1.1", None, "", 400),
        ("HTTP/1.1", Some("ssp"), "Host: ssp\r\n", 400),
        ("HTTP/1.1", Some("a b"), "", 400),
        ("HTTP/1.1", Some("ssp@evil:443"), "", 400),
        ("HTTP/1.1", Some("[::1]:8443"), "", 200),
        ("HTTP/1.0", None, "", 200),
    ];
    for (n, (version, host, extra, status)) in (41..).zip(cases) {
        let id = trace_id(n);
        let extra = format!("{extra}Connection: close\r\n");
        let raw = Raw {
            host,
            extra: &extra,
            ..Raw::get("/metadata", version)
        };
        let (answer, _) = raw.send(&p, &id).await;
        let case = format!("{version} host {host:?} extra {extra:?}");
        assert_eq!(status_of(&answer), status, "{case}");
        if status == 400 {
            assert!(
                String::from_utf8_lossy(&answer).contains("MISSING_OR_INVALID_HEADER_Host"),
                "{case}"
            );
        }
        let seen = provider.seen().iter().any(|s| {
            s.headers
                .get("ssp-traceid")
                .is_some_and(|v| v.to_str().unwrap() == id)
        });
        assert_eq!(seen, status == 200, "{case}");
    }
}

/// A consumer's malformed chunked body is the consumer's fault: 400 `MALFORMED_REQUEST_BODY`, the connection
/// closed, recorded `client_error` and counted as a refusal, with no upstream error counted.
#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_400() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let p = Proxied::start(pki, provider.addr).await;
    let long_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(20_000));
    let bodies: [(&str, &[u8]); 4] = [
        ("0x5 size", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("bare LF", b"5\nhello\n0\n\n"),
        ("no CRLF after data", b"5\r\nhelloXX0\r\n\r\n"),
        ("20 KB extension", long_extension.as_bytes()),
    ];
    for (n, (case, body)) in (51..).zip(bodies) {
        let id = trace_id(n);
        let raw = Raw {
            method: "POST",
            host: Some("ssp"),
            extra: "Transfer-Encoding: chunked\r\n",
            body,
            ..Raw::get("/upload", "HTTP/1.1")
        };
        // The proxy answers and closes, without waiting for more of the body.
        let (answer, _) = raw.send(&p, &id).await;
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status_of(&answer), 400, "{case}: {text}");
        assert!(text.contains("MALFORMED_REQUEST_BODY"), "{case}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{case}: {text}"
        );
        let record = p.response_record(&id).await;
        assert_eq!(record["outcome"], "client_error", "{case}");
        assert_eq!(record["status"], 400, "{case}");
    }
    assert_eq!(
        p.metric("ssp_denials_total{reason=\"malformed_request_body\"}")
            .await,
        4
    );
    assert_eq!(
        p.metric("ssp_upstream_errors_total{kind=\"upstream_error\"}")
            .await,
        0
    );
}
