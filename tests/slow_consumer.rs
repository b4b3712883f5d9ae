//! A consumer cannot hold the proxy's provider connections: one that stops reading its answer (HTTP/1.1, or an
//! HTTP/2 stream whose window runs out) is cut after `upstream.body_idle_timeout`, and one that cancels its HTTP/2
//! streams right after opening them has its connection closed after a bounded number. The real binary, real
//! sockets on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The real binary in front of the test provider, with `[limits]` and `body_idle_timeout` of the test's own.
async fn start(
    limits: &str,
    body_idle_timeout: &'static str,
) -> (Pki, Provider, Served, std::net::SocketAddr) {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let admin = closed_port().await;
    let setup = Setup {
        body_idle_timeout,
        response_timeout: "60s",
        limits: limits.to_owned(),
        admin: admin.to_string(),
        ..Setup::default()
    };
    let served = serve_setup(&pki, provider.addr, &setup, &[], ChildLog::Null).await;
    (pki, provider, served, admin)
}

/// An HTTP/2 connection whose streams open with a zero window (`SETTINGS_INITIAL_WINDOW_SIZE = 0`): response heads
/// arrive, no body byte may until the client opens the window, which it never does.
async fn zero_window_sender(
    pki: &Pki,
    proxy: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tls = Consumer::new(pki, Some("consumer"), proxy, true)
        .tls_h2()
        .await;
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A traced GET of `tail` as an HTTP/2 request (absolute URI for `:authority`, no `Host`).
fn http2_request(url: &str, tail: &str, n: u32) -> http::Request<TestBody> {
    let mut req = traced_get(url, tail, &trace_id(n));
    *req.uri_mut() = format!("https://ssp.dev.localhost{}", req.uri())
        .parse()
        .unwrap();
    req.headers_mut().remove("host");
    req
}

/// A request of `consumer`'s for the metadata interaction gets its 200 (the provider's slots are free).
async fn assert_served(consumer: &Consumer, url: &str) {
    let answer = within(
        "a request after the cut",
        consumer.fetch(traced_get(url, "/metadata", &trace_id(4))),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
}

/// Four consumers that stop reading an endless answer (two over HTTP/1.1 after 1 KiB, one over HTTP/2 that never
/// reads its stream, one over HTTP/2 whose stream window is zero from the start) hold every provider connection the
/// limit allows (4). Each is cut after
/// `body_idle_timeout` (2 s): recorded `timeout`, counted as a send timeout and not as a provider error, its
/// provider connection closed (the provider sees its stream break); then the next consumer is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_and_frees_its_provider_connection() {
    let (pki, provider, served, admin) = start("per_provider_connections = 4", "2s").await;
    let url = endpoint_url(provider.addr);

    // HTTP/1.1, by hand: the request, 1 KiB of the answer, then nothing more is read.
    let h1 = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let mut held = Vec::new();
    for n in [1, 2] {
        let mut tls = h1.tls().await;
        let req = traced_get(&url, "/infinite", &trace_id(n));
        let mut head = format!("GET {} HTTP/1.1\r\n", req.uri());
        for (name, value) in req.headers() {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        head.push_str("\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut first = vec![0u8; 1024];
        within("the first KiB", tls.read_exact(&mut first))
            .await
            .unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        held.push(tls);
    }
    // HTTP/2: the response head, and the body never read (hyper's client gives back window only as it is read).
    let mut h2 = Consumer::new(&pki, Some("consumer"), served.addr, true)
        .connect()
        .await
        .unwrap();
    let response = within(
        "the h2 head",
        h2.send(traced_get(&url, "/infinite", &trace_id(3))),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // HTTP/2 with a zero initial stream window: the head arrives, no body byte ever may.
    let mut zero = zero_window_sender(&pki, served.addr).await;
    let zero_window = within(
        "the zero-window head",
        zero.send_request(http2_request(&url, "/infinite", 5)),
    )
    .await
    .unwrap();
    assert_eq!(zero_window.status(), StatusCode::OK);

    for n in [1, 2, 3, 5] {
        let record = response_record(&pki.dir.path().join("data/audit"), &trace_id(n)).await;
        assert_eq!(record["outcome"], "timeout", "consumer {n}");
        assert_eq!(record["status"], 200, "consumer {n}");
    }
    // Every provider stream broke: the proxy closed each provider connection.
    let deadline = std::time::Instant::now() + STEP;
    while provider.state.broken.load(Ordering::SeqCst) < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "provider streams still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric_value(admin, "ssp_connections_cut_total{reason=\"send_timeout\"}").await,
        4
    );
    assert_eq!(
        metric_value(admin, "ssp_upstream_errors_total{kind=\"timeout\"}").await,
        0
    );
    // The limit's connections are free again: another consumer is served at once.
    assert_served(&h1, &url).await;
    drop((held, response, zero_window));
}

/// An HTTP/2 consumer that cancels each stream as soon as its request has reached the provider (before the answer)
/// or as soon as the answer's head arrives (each cancel closes the provider connection the exchange was on) has
/// its connection closed once it has cancelled more than 10 streams within a second of their start (and more than
/// half of its exchanges): the provider sees at most a dozen connections per consumer connection, not one per
/// cancel, and each cut is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premature_http2_resets_are_bounded_per_connection() {
    let (pki, provider, served, admin) = start("", "10s").await;
    let url = endpoint_url(provider.addr);
    for (round, (tail, after_head)) in [("/silent", false), ("/infinite", true)]
        .into_iter()
        .enumerate()
    {
        let mut h2 = Consumer::new(&pki, Some("consumer"), served.addr, true)
            .connect()
            .await
            .unwrap();
        let dialled = provider.state.connections.load(Ordering::SeqCst);
        let first = 100 + 100 * round as u32;
        let mut refused_at = None;
        for n in 0..40u32 {
            let before = provider.state.connections.load(Ordering::SeqCst);
            let send = h2.send(traced_get(&url, tail, &trace_id(first + n)));
            tokio::pin!(send);
            // Cancel once the request has reached the provider (a new provider connection was opened for it),
            // or once the answer's head has come.
            let reached = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    tokio::select! {
                        result = &mut send => return Some(result),
                        () = tokio::time::sleep(Duration::from_millis(10)), if !after_head => {
                            if provider.state.connections.load(Ordering::SeqCst) > before {
                                return None;
                            }
                        }
                    }
                }
            })
            .await
            .expect("neither an answer nor the request at the provider");
            match reached {
                // The head came: dropping the response resets the stream mid-body.
                Some(Ok(response)) if after_head => drop(response),
                // The connection is going away: the proxy stopped taking streams.
                Some(result) => {
                    assert!(
                        result.is_err(),
                        "{tail}: stream {n} answered: {:?}",
                        result.map(|r| r.status())
                    );
                    refused_at = Some(n);
                    break;
                }
                // Dropping the response future resets the stream (RST_STREAM CANCEL).
                None => {}
            }
        }
        let refused_at =
            refused_at.unwrap_or_else(|| panic!("{tail}: the connection was never closed"));
        assert!(
            (11..=13).contains(&refused_at),
            "{tail}: closed after {refused_at} cancelled streams"
        );
        let opened = provider.state.connections.load(Ordering::SeqCst) - dialled;
        assert!(opened <= 13, "{tail}: {opened} provider connections");
        assert_eq!(
            metric_value(
                admin,
                "ssp_connections_cut_total{reason=\"premature_resets\"}"
            )
            .await,
            round as u64 + 1
        );
        // Each cancelled exchange has its pair of records, `client_closed`.
        let record = response_record(&pki.dir.path().join("data/audit"), &trace_id(first)).await;
        assert_eq!(record["outcome"], "client_closed", "{tail}");
    }
}

/// A zero stream window on small answers (a few bytes with `Content-Length`) cannot hold the provider's slots
/// either: with `per_provider_concurrency = 3`, three such HTTP/2 streams on one connection are cut after
/// `body_idle_timeout`, each recorded `timeout` (none of them delivered a byte), the connection counted once, and
/// the next consumer is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_on_a_small_answer_does_not_hold_the_providers_slots() {
    let (pki, provider, served, admin) = start("per_provider_concurrency = 3", "2s").await;
    let url = endpoint_url(provider.addr);
    let zero = zero_window_sender(&pki, served.addr).await;
    let mut held = Vec::new();
    for n in 1..=3 {
        let mut sender = zero.clone();
        let response = within(
            "a zero-window head",
            sender.send_request(http2_request(&url, "/metadata", n)),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().contains_key("content-length"));
        held.push(response);
    }
    for n in 1..=3 {
        let record = response_record(&pki.dir.path().join("data/audit"), &trace_id(n)).await;
        assert_eq!(record["outcome"], "timeout", "stream {n}");
    }
    assert_eq!(
        metric_value(admin, "ssp_connections_cut_total{reason=\"send_timeout\"}").await,
        1
    );
    assert_served(
        &Consumer::new(&pki, Some("consumer"), served.addr, false),
        &url,
    )
    .await;
    drop(held);
}
