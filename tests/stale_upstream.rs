//! Provider connections that cannot carry the next request: a stale pooled connection (the provider's idle close
//! racing a request) is retried once for an idempotent request without a body, and never for one with a body; a
//! connection left with an unsent request body is not reused; a body cut without close_notify arrives whole, then
//! breaks. Raw providers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------------------------
// A stale pooled provider connection.

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
// A provider that answers before it has read the request body.

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
