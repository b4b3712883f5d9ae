//! Limits and throttling, upstream faults, and hostile input, each against the real proxy on loopback:
//! the consumer's answer, what the provider saw, and the audit records.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The second consumer (FROM_2, `consumer2`) may also call the test provider.
fn second_consumer_agreement() -> String {
    format!(
        r#"
[[agreement]]
id = "DSA-2-TO"
from = "{FROM_2}"
to = "{TO}"
interactions = ["*"]
"#
    )
}

/// A GET of `tail` under the test endpoint from `from`, with its own trace id.
fn get_as(w: &World, from: &str, tail: &str, trace: &str) -> http::Request<TestBody> {
    let mut r = ssp_request(Method::GET, &format!("/{}{tail}", w.url), METADATA)
        .body(empty())
        .unwrap();
    r.headers_mut().insert("ssp-from", from.parse().unwrap());
    r.headers_mut()
        .insert("ssp-traceid", trace.parse().unwrap());
    r
}

fn trace(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// The records of one trace id, waiting for `n` of them.
async fn records_of(w: &World, trace_id: &str, n: usize) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let all = audit_records(&w.audit_dir(), 0).await;
        let mine: Vec<_> = all
            .into_iter()
            .filter(|r| r["trace_id"] == trace_id)
            .collect();
        if mine.len() >= n || started.elapsed() > STEP {
            return mine;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rate_headers(a: &Answer) -> (String, String, u64) {
    let h = |name: &str| {
        a.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let reset: u64 = h("x-rate-limit-reset").parse().unwrap();
    assert_eq!(h("retry-after"), reset.to_string());
    (h("x-rate-limit-limit"), h("x-rate-limit-remaining"), reset)
}

// -------------------------------------------------------------------------------------------------------------
// 1. Limits.

/// Past its token bucket a consumer gets 429 with the `X-Rate-Limit-*` headers and a record of the refusal;
/// another consumer is unaffected, and the first is served again once its bucket refills.
#[tokio::test]
async fn per_consumer_rate_gives_429_with_rate_limit_headers() {
    let w = World::start_with(Setup {
        limits: "per_consumer_rps = 2\nper_consumer_burst = 2".into(),
        extra_policy: second_consumer_agreement(),
        // The limiter reads the clock of the runtime the request runs on; this test moves it.
        on_test_runtime: true,
        ..Setup::default()
    })
    .await;
    let one = w.consumer("consumer");
    for n in 1..=2 {
        let a = within(
            "ok",
            one.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(n))),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    let a = within(
        "429",
        one.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(3))),
    )
    .await
    .unwrap();
    a.assert_outcome(
        429,
        "throttled",
        &format!("RATE_LIMIT_EXCEEDED_MESSAGESENDER_{FROM}"),
    );
    let (limit, remaining, reset) = rate_headers(&a);
    assert_eq!((limit.as_str(), remaining.as_str()), ("2", "0"));
    assert_eq!(reset, 1);
    assert_eq!(a.headers["ssp-traceid"], trace(3).as_str());
    assert!(a.headers.get("connection").is_none());
    // Refused with its body unread: the connection closes after the answer, and the answer says so.
    let mut post = ssp_request(Method::POST, &format!("/{}/fhir/echo", w.url), STRUCTURED)
        .body(full(vec![b'x'; 256 * 1024]))
        .unwrap();
    post.headers_mut()
        .insert("ssp-traceid", trace(30).parse().unwrap());
    let a = within("429 post", one.fetch(post)).await.unwrap();
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["connection"], "close");
    // A small refused body is read and discarded: the same connection carries the next request.
    let mut sender = within("connect", one.connect()).await.unwrap();
    let mut small = ssp_request(Method::POST, &format!("/{}/fhir/echo", w.url), STRUCTURED)
        .body(full(vec![b'x'; 16 * 1024]))
        .unwrap();
    small
        .headers_mut()
        .insert("ssp-traceid", trace(31).parse().unwrap());
    let r = within("429 small post", sender.send(small)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("connection").is_none());
    drain(r.into_body()).await.unwrap();
    let again = within(
        "same connection",
        sender.send(get_as(&w, FROM, "/fhir/metadata", &trace(32))),
    )
    .await
    .unwrap();
    // (Answered at all on this connection is the point; on a slow machine a token may have come back.)
    assert!(
        [StatusCode::TOO_MANY_REQUESTS, StatusCode::OK].contains(&again.status()),
        "{again:?}"
    );
    let throttled = 3 + u32::from(again.status() == StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        w.provider.seen().len(),
        2,
        "the provider saw the refused request"
    );
    // Another consumer has its own bucket.
    let two = w.consumer("consumer2");
    let b = within(
        "other",
        two.fetch(get_as(&w, FROM_2, "/fhir/metadata", &trace(4))),
    )
    .await
    .unwrap();
    assert_eq!(b.status, StatusCode::OK);
    // The refusal left both records.
    let records = records_of(&w, &trace(3), 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["decision"], "deny");
    assert_eq!(
        records[0]["reason"],
        format!("RATE_LIMIT_EXCEEDED_MESSAGESENDER_{FROM}")
    );
    assert_eq!(records[1]["status"], 429);
    assert_eq!(records[1]["outcome"], "denied");
    // Half a second at 2/s gives one token back. The limiter reads tokio's clock, so the test moves that clock on
    // instead of waiting.
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(600)).await;
    tokio::time::resume();
    let c = within(
        "refilled",
        one.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(5))),
    )
    .await
    .unwrap();
    assert_eq!(c.status, StatusCode::OK);
    let metrics = w.metrics.render();
    assert!(
        metrics.contains(&format!(
            "ssp_denials_total{{reason=\"consumer_rate_limit\"}} {throttled}"
        )),
        "{metrics}"
    );
}

/// A consumer with an exchange open at its concurrency limit gets 429 for the next one; when the exchange ends
/// the slot is free again. Another consumer is served meanwhile.
#[tokio::test]
async fn per_consumer_concurrency_gives_429_until_the_exchange_ends() {
    let w = World::start_with(Setup {
        limits: "per_consumer_concurrency = 1".into(),
        extra_policy: second_consumer_agreement(),
        ..Setup::default()
    })
    .await;
    let one = w.consumer("consumer");
    let open = within("slow", one.send(get_as(&w, FROM, "/fhir/slow", &trace(1))))
        .await
        .unwrap();
    let a = within(
        "429",
        one.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(2))),
    )
    .await
    .unwrap();
    a.assert_outcome(
        429,
        "throttled",
        &format!("CONCURRENCY_LIMIT_EXCEEDED_MESSAGESENDER_{FROM}"),
    );
    assert_eq!(rate_headers(&a), ("1".into(), "0".into(), 1));
    let b = within(
        "other consumer",
        w.consumer("consumer2")
            .fetch(get_as(&w, FROM_2, "/fhir/metadata", &trace(3))),
    )
    .await
    .unwrap();
    assert_eq!(b.status, StatusCode::OK);
    w.provider.state.release_slow.notify_one();
    let body = within("slow body", open.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "first,last");
    // The slot is given back when the exchange's records are written, just after the body ends.
    let started = Instant::now();
    loop {
        let c = within(
            "again",
            one.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(4))),
        )
        .await
        .unwrap();
        if c.status == StatusCode::OK {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A provider at its concurrency limit gets no more exchanges: 503 with the `X-Rate-Limit-*` headers.
#[tokio::test]
async fn per_provider_concurrency_gives_503() {
    let w = World::start_with(Setup {
        limits: "per_provider_concurrency = 1".into(),
        extra_policy: second_consumer_agreement(),
        ..Setup::default()
    })
    .await;
    let open = within(
        "slow",
        w.consumer("consumer")
            .send(get_as(&w, FROM, "/fhir/slow", &trace(1))),
    )
    .await
    .unwrap();
    let a = within(
        "503",
        w.consumer("consumer2")
            .fetch(get_as(&w, FROM_2, "/fhir/metadata", &trace(2))),
    )
    .await
    .unwrap();
    a.assert_outcome(
        503,
        "throttled",
        &format!("PROVIDER_CONCURRENCY_LIMIT_EXCEEDED_MESSAGERECEIVER_{TO}"),
    );
    assert_eq!(rate_headers(&a), ("1".into(), "0".into(), 1));
    assert_eq!(w.provider.seen().len(), 1);
    w.provider.state.release_slow.notify_one();
    within("slow body", open.into_body().collect())
        .await
        .unwrap();
    let records = records_of(&w, &trace(2), 2).await;
    assert_eq!(records[1]["status"], 503);
}

/// Header bytes and header count over `[limits]` get a documented 431 with audit records; far over hyper's own
/// backstop a bare 431 and a closed connection. The proxy serves on.
#[tokio::test]
async fn oversized_headers_get_431() {
    let w = World::start_with(Setup {
        limits: "max_header_bytes = \"8KiB\"\nmax_header_count = 20".into(),
        ..Setup::default()
    })
    .await;
    let consumer = w.consumer("consumer");
    let mut big = get_as(&w, FROM, "/fhir/metadata", &trace(1));
    big.headers_mut()
        .insert("x-padding", "p".repeat(9 * 1024).parse().unwrap());
    let a = within("bytes", consumer.fetch(big)).await.unwrap();
    a.assert_outcome(431, "too-long", "REQUEST_HEADER_FIELDS_TOO_LARGE");
    let mut many = get_as(&w, FROM, "/fhir/metadata", &trace(2));
    for i in 0..20 {
        many.headers_mut().insert(
            format!("x-extra-{i}")
                .as_str()
                .parse::<http::HeaderName>()
                .unwrap(),
            "1".parse().unwrap(),
        );
    }
    let a = within("count", consumer.fetch(many)).await.unwrap();
    a.assert_outcome(431, "too-long", "REQUEST_HEADER_FIELDS_TOO_LARGE");
    assert!(w.provider.seen().is_empty());
    assert_eq!(records_of(&w, &trace(1), 2).await[1]["status"], 431);
    assert_eq!(records_of(&w, &trace(2), 2).await[1]["status"], 431);
    // Far beyond: hyper refuses the head itself.
    let mut huge = get_as(&w, FROM, "/fhir/metadata", &trace(3));
    huge.headers_mut()
        .insert("x-padding", "p".repeat(200 * 1024).parse().unwrap());
    let r = within("huge", consumer.send(huge)).await.unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.headers()["connection"], "close");
    assert!(w.provider.seen().is_empty());
    let ok = within(
        "after",
        consumer.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(4))),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
}

/// At `server.max_connections` a further connection waits in the backlog, and is served as soon as one closes.
#[tokio::test]
async fn connections_over_the_limit_wait_and_are_then_served() {
    let w = World::start_with(Setup {
        max_connections: 2,
        ..Setup::default()
    })
    .await;
    let consumer = w.consumer("consumer");
    let mut first = within("1", consumer.connect()).await.unwrap();
    let second = within("2", consumer.connect()).await.unwrap();
    // The third connection's TCP handshake completes in the kernel's backlog; its TLS handshake waits for ssp.
    let tcp = within("3: TCP", tokio::net::TcpStream::connect(w.proxy.addr))
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let consumer = consumer.clone();
        let req = get_as(&w, FROM, "/fhir/metadata", &trace(3));
        async move { consumer.connect_over(tcp).await?.send(req).await }
    });
    // The first two still work. A whole exchange on the first is time enough, on this one-thread runtime, for the
    // accept loop to have taken the third had the limit let it: the proxy has accepted two connections.
    let r = within(
        "on 1",
        first.send(get_as(&w, FROM, "/fhir/metadata", &trace(1))),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        w.metrics.connections_total.get(),
        2,
        "a third connection was accepted"
    );
    assert!(!waiting.is_finished(), "a third connection was served");
    drop((first, second));
    let third = within("3 after a close", waiting).await.unwrap().unwrap();
    assert_eq!(third.status(), StatusCode::OK);
    assert_eq!(w.metrics.connections_total.get(), 3);
}

/// A slowloris consumer dribbling its request head is cut at `header_read_timeout`, and one that never starts
/// its handshake at `handshake_timeout`, while another consumer is served at full speed throughout.
#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let w = World::start_with(Setup {
        header_read_timeout: "2s",
        handshake_timeout: "2s",
        ..Setup::default()
    })
    .await;
    let consumer = w.consumer("consumer");
    let tls = within("tls", consumer.tls()).await;
    let mut silent_tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
    // The cut is when the proxy closes its side (close_notify, then EOF on the dribbler's read half): it then
    // discards what still arrives for a bounded time (the staged close), so the dribbler's writes may go on
    // succeeding for a while after it.
    let dribble = tokio::spawn(async move {
        let started = Instant::now();
        let head = format!(
            "GET /https://x HTTP/1.1\r\nHost: ssp\r\nX-Slow: {}",
            "s".repeat(100)
        );
        let (mut read, mut write) = tokio::io::split(tls);
        let cut = async {
            let mut buf = [0u8; 1024];
            while matches!(read.read(&mut buf).await, Ok(1..)) {}
        };
        let writes = async {
            for byte in head.as_bytes() {
                if write.write_all(&[*byte]).await.is_err() || write.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = cut => {}
            () = writes => {}
        }
        started.elapsed()
    });
    // Meanwhile, normal service: every request answered quickly.
    let mut n = 10;
    while !dribble.is_finished() {
        let started = Instant::now();
        let a = within(
            "normal",
            consumer.fetch(get_as(&w, FROM, "/fhir/metadata", &trace(n))),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "slow service: {:?}",
            started.elapsed()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_after = dribble.await.unwrap();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&cut_after),
        "dribbler cut after {cut_after:?}"
    );
    assert!(n > 12, "only {} normal requests", n - 10);
    let mut buf = [0u8; 8];
    assert_eq!(
        within("silent tcp closed", silent_tcp.read(&mut buf))
            .await
            .unwrap_or(0),
        0
    );
    assert!(
        w.provider
            .seen()
            .iter()
            .all(|s| s.path_and_query.ends_with("/fhir/metadata"))
    );
}

/// A consumer that stops sending its request body mid-way is cut at `body_idle_timeout`: 504, recorded as a
/// timeout, like any other idle body.
#[tokio::test]
async fn slow_body_consumer_is_cut_off() {
    let w = World::start_with(Setup {
        body_idle_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let (tx, body) = ChannelBody::new();
    let mut req = ssp_request(Method::POST, &format!("/{}/fhir/upload", w.url), STRUCTURED)
        .body(body.boxed())
        .unwrap();
    req.headers_mut()
        .insert("ssp-traceid", trace(1).parse().unwrap());
    tx.send(bytes::Bytes::from_static(b"first part"))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = within("cut", w.consumer("consumer").fetch(req)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut after {elapsed:?}"
    );
    answer.unwrap().assert_outcome(
        504,
        "transient",
        &format!(
            "TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{}/fhir/upload",
            w.url
        ),
    );
    drop(tx);
    let records = records_of(&w, &trace(1), 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1]["outcome"], "timeout");
    assert_eq!(records[1]["status"], 504);
    assert_eq!(records[1]["bytes_in"], 10);
}

/// `per_provider_connections` bounds the TLS connections to one provider: a third concurrent exchange waits for
/// a pooled connection instead of opening one.
#[tokio::test]
async fn provider_connections_are_bounded() {
    let w = World::start_with(Setup {
        limits: "per_provider_connections = 2".into(),
        ..Setup::default()
    })
    .await;
    let consumer = w.consumer("consumer");
    let mut open = Vec::new();
    for n in 0..2 {
        open.push(
            within(
                "slow",
                consumer.send(get_as(&w, FROM, "/fhir/slow", &trace(n))),
            )
            .await
            .unwrap(),
        );
    }
    let third = tokio::spawn({
        let consumer = consumer.clone();
        let req = get_as(&w, FROM, "/fhir/metadata", &trace(2));
        async move { consumer.fetch(req).await }
    });
    // The third request is permitted and recorded before it is forwarded: once its record is written it is
    // waiting for a provider connection. A whole refused exchange after that is time enough, on this one-thread
    // runtime, for a third connection to have been opened had the bound let it.
    let recorded = records_of(&w, &trace(2), 1).await;
    assert_eq!(
        recorded.first().map(|r| &r["decision"]),
        Some(&"permit".into())
    );
    let refused = within(
        "refused meanwhile",
        consumer.fetch(get_as(&w, "200000000999", "/fhir/metadata", &trace(3))),
    )
    .await
    .unwrap();
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        !third.is_finished(),
        "a third provider connection was opened"
    );
    assert_eq!(w.provider.state.connections.load(Ordering::SeqCst), 2);
    w.provider.state.release_slow.notify_waiters();
    for response in open {
        within("slow body", response.into_body().collect())
            .await
            .unwrap();
    }
    let a = within("third", third).await.unwrap().unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(w.provider.state.connections.load(Ordering::SeqCst), 2);
}

// -------------------------------------------------------------------------------------------------------------
// 2. Upstream faults: what the consumer gets and what the audit trail says.

const TO_RAW: &str = "918999198995";
const TO_UNTRUSTED: &str = "918999198996";
const TO_WRONG_NAME: &str = "918999198997";

fn fault_endpoint(asid: &str, url: &str) -> String {
    format!(
        r#"
[[endpoint]]
asid = "{asid}"
party_key = "F{asid}"
cpa_id = "C{asid}"
ods = "F{asid}"
url = "{url}"
interactions = ["{METADATA}"]

[[agreement]]
id = "DSA-{asid}"
from = "{FROM}"
to = "{asid}"
interactions = ["*"]
"#
    )
}

struct Faults {
    w: World,
    raw: FaultProvider,
    untrusted: FaultProvider,
}

/// A world with three more endpoints: a raw misbehaving provider (`localhost:<port>`), a provider whose
/// certificate no configured CA signed, and a name the raw provider's certificate does not carry.
async fn faults() -> Faults {
    let pki = Pki::generate();
    let raw = FaultProvider::for_pki(&pki).await;
    let stranger = Pki::generate();
    let untrusted = FaultProvider::for_pki(&stranger).await;
    let (rp, up) = (raw.addr.port(), untrusted.addr.port());
    let w = World::start_in(
        pki,
        Setup {
            response_timeout: "2s",
            extra_resolve: format!(
                "\"localhost:{rp}\" = \"{}\"\n\"provider.dev.localhost:{up}\" = \"{}\"\n\"wrongname.dev.localhost:{rp}\" = \"{}\"\n",
                raw.addr, untrusted.addr, raw.addr,
            ),
            extra_policy: fault_endpoint(TO_RAW, &format!("https://localhost:{rp}/gp"))
                + &fault_endpoint(TO_UNTRUSTED, &format!("https://provider.dev.localhost:{up}/gp"))
                + &fault_endpoint(TO_WRONG_NAME, &format!("https://wrongname.dev.localhost:{rp}/gp")),
            ..Setup::default()
        },
    )
    .await;
    Faults { w, raw, untrusted }
}

/// Sends `GET <url>` to provider `to` with its own trace id and returns the answer (or the transport error)
/// and the exchange's two audit records.
async fn fault_exchange(
    w: &World,
    to: &str,
    url: &str,
    n: u32,
) -> (Result<Answer, String>, Vec<serde_json::Value>) {
    let path = format!("/{url}");
    let mut req = ssp_request(Method::GET, &path, METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut().insert("ssp-to", to.parse().unwrap());
    req.headers_mut()
        .insert("ssp-traceid", trace(n).parse().unwrap());
    let answer = within(url, w.consumer("consumer").fetch(req)).await;
    let records = records_of(w, &trace(n), 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    (answer, records)
}

/// Each upstream fault: the consumer's documented answer and the exchange's recorded outcome.
#[tokio::test]
async fn upstream_faults_are_answered_and_recorded() {
    let f = faults().await;
    let w = &f.w;
    let raw = |tail: &str| format!("https://localhost:{}/gp{tail}", f.raw.addr.port());
    let bad_gateway = |a: &Result<Answer, String>, url: &str| {
        a.as_ref().unwrap().assert_outcome(
            502,
            "transient",
            &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{url}"),
        );
    };
    // Connection refused.
    let down = format!(
        "https://provider2.dev.localhost:{}/gp/fhir/metadata",
        w.down.port()
    );
    let (a, r) = fault_exchange(w, TO_DOWN, &down, 1).await;
    bad_gateway(&a, &down);
    assert_eq!(
        (r[1]["status"].clone(), r[1]["outcome"].clone()),
        (502.into(), "upstream_error".into())
    );
    // A certificate from a CA the proxy does not trust.
    let untrusted = format!(
        "https://provider.dev.localhost:{}/gp/fhir/metadata",
        f.untrusted.addr.port()
    );
    let (a, r) = fault_exchange(w, TO_UNTRUSTED, &untrusted, 2).await;
    bad_gateway(&a, &untrusted);
    assert_eq!(r[1]["outcome"], "upstream_error");
    // A trusted certificate for another name.
    let wrong = format!(
        "https://wrongname.dev.localhost:{}/gp/fhir/metadata",
        f.raw.addr.port()
    );
    let (a, r) = fault_exchange(w, TO_WRONG_NAME, &wrong, 3).await;
    bad_gateway(&a, &wrong);
    assert_eq!(r[1]["outcome"], "upstream_error");
    assert_eq!(
        f.raw.requests.load(Ordering::SeqCst),
        0,
        "a request crossed a failed handshake"
    );
    // An answer that is not HTTP.
    let (a, r) = fault_exchange(w, TO_RAW, &raw("/garbage"), 4).await;
    bad_gateway(&a, &raw("/garbage"));
    assert_eq!(r[1]["outcome"], "upstream_error");
    // The connection closed before any answer.
    let (a, r) = fault_exchange(w, TO_RAW, &raw("/hangup"), 5).await;
    bad_gateway(&a, &raw("/hangup"));
    assert_eq!(r[1]["outcome"], "upstream_error");
    // Reset mid-response: the consumer's body breaks, it is never completed short.
    let (a, r) = fault_exchange(w, TO_RAW, &raw("/reset"), 6).await;
    let e = a.expect_err("a cut response read as complete");
    assert!(!e.is_empty());
    assert_eq!(r[1]["status"], 200);
    assert_eq!(r[1]["outcome"], "upstream_error");
    assert_eq!(r[1]["bytes_out"], 1000);
    // A provider that never answers: 504 after response_timeout (2s).
    let silent = format!("{}/fhir/silent", w.url);
    let started = Instant::now();
    let (a, r) = fault_exchange(w, TO, &silent, 7).await;
    assert!(started.elapsed() >= Duration::from_millis(1900));
    a.unwrap().assert_outcome(
        504,
        "transient",
        &format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{silent}"),
    );
    assert_eq!(r[1]["outcome"], "timeout");
    // And after all that, normal service.
    let ok = within(
        "ok",
        w.consumer("consumer")
            .fetch(get_as(w, FROM, "/fhir/metadata", &trace(8))),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
    let counters = w.metrics.render();
    assert!(
        counters.contains("ssp_upstream_errors_total{kind=\"upstream_error\"} 6"),
        "{counters}"
    );
    assert!(
        counters.contains("ssp_upstream_errors_total{kind=\"timeout\"} 1"),
        "{counters}"
    );
}

// -------------------------------------------------------------------------------------------------------------
// 3. Hostile input.

/// Writes raw bytes on a fresh consumer TLS connection and returns the status of the answer (0 when the
/// connection closed without one).
async fn raw_status(w: &World, request: &[u8]) -> u16 {
    let mut tls = within("tls", w.consumer("consumer").tls()).await;
    tls.write_all(request).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the status line; the connection may stay open after it.
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match within("raw answer", tls.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Every SSRF trick in the target URL gets a 400-class answer, and no request reaches any provider.
#[tokio::test]
async fn hostile_target_urls_are_refused() {
    let w = World::start().await;
    let p = w.provider.addr.port();
    let host = format!("provider.dev.localhost:{p}");
    let invalid = [
        format!("/https://user@{host}/gp/fhir/metadata"),
        format!("/https://{host}@127.0.0.1:{p}/gp/fhir/metadata"),
        format!("/https://user:pass@{host}/gp/fhir/metadata"),
        format!("/https://{host}/gp/%2e%2e/admin"),
        format!("/https://{host}/gp/.%2E/admin"),
        format!("/https://{host}/gp/fhir/..%2Fadmin"),
        format!("/https://{host}/gp/fhir%5C..%5Cadmin"),
        format!("/https://{host}/gp/fhir/%00"),
        format!("/https://{host}/gp/../admin"),
        format!("/https://[fe80::1%25eth0]:{p}/gp/fhir/metadata"),
        "/https://[::1/gp/fhir/metadata".to_owned(),
        format!("/https://{host}:443/gp/fhir/metadata"),
        format!("/http://{host}/gp/fhir/metadata"),
        format!("/https://{host}/gp/fhir/{}", "a".repeat(9 * 1024)),
        "/https:///gp/fhir/metadata".to_owned(),
        "/provider.dev.localhost/gp".to_owned(),
        "*".to_owned(),
    ];
    let mut raw_sent = 0;
    for (i, path) in invalid.iter().enumerate() {
        let mut req = ssp_request(Method::GET, "/x", METADATA)
            .body(empty())
            .unwrap();
        match path.parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                // Too odd for http::Uri to build: sent raw, where hyper's parser or ours must refuse it.
                let raw = format!(
                    "GET {path} HTTP/1.1\r\nHost: ssp\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\nSsp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nConnection: close\r\n\r\n"
                );
                raw_sent += 1;
                assert_eq!(raw_status(&w, raw.as_bytes()).await, 400, "{path}");
                continue;
            }
        }
        let a = within(path, w.consumer("consumer").fetch(req))
            .await
            .unwrap();
        if path == "*" {
            assert!(a.status.is_client_error(), "{path}: {a:?}");
        } else {
            a.assert_outcome(400, "invalid", "INVALID_TARGET_URL");
        }
        assert!(
            w.provider.seen().is_empty(),
            "case {i} reached the provider"
        );
    }
    println!("{raw_sent} of {} sent raw", invalid.len());
    // Well-formed, but not the registered text: an IP for the name, IPv6 forms, a mapped IPv4 address.
    for path in [
        format!("/https://127.0.0.1:{p}/gp/fhir/metadata"),
        format!("/https://[::1]:{p}/gp/fhir/metadata"),
        format!("/https://[::ffff:127.0.0.1]:{p}/gp/fhir/metadata"),
        format!("/https://PROVIDER.dev.localhost:{p}/gp/fhir/metadata"),
    ] {
        let mut req = ssp_request(Method::GET, "/x", METADATA)
            .body(empty())
            .unwrap();
        *req.uri_mut() = path.parse().unwrap();
        let a = within(&path, w.consumer("consumer").fetch(req))
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}");
        let text = a.json()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            text.starts_with("ENDPOINT_") || text == "INVALID_TARGET_URL",
            "{path}: {text}"
        );
    }
    // Bytes http::Uri will not even carry: NUL, control characters, non-ASCII, a fragment, raw spaces.
    let token = bearer(&claims(&w.url, METADATA));
    for target in [
        format!("/https://{host}/gp/fhir/\0metadata").into_bytes(),
        format!("/https://{host}/gp/fhir/\x01metadata").into_bytes(),
        format!("/https://{host}/gp/fhir/métadata").into_bytes(),
        format!("/https://{host}/gp/fhir/meta data").into_bytes(),
    ] {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(&target);
        request.extend_from_slice(
            format!(
                " HTTP/1.1\r\nHost: ssp\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\nSsp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        let status = raw_status(&w, &request).await;
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(&target));
    }
    assert!(w.provider.seen().is_empty());
    // A fragment never reaches the proxy: hyper's request-target parser drops it, so it is never forwarded.
    let request = format!(
        "GET /https://{host}/gp/fhir/metadata#/../../admin HTTP/1.1\r\nHost: ssp\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\nSsp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw_status(&w, request.as_bytes()).await, 200);
    let seen = w.provider.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/gp/fhir/metadata");
}

/// Repeated, huge, non-ASCII and control-character `Ssp-*` headers: each a 400 naming the header (or hyper's
/// own 400 for bytes HTTP forbids), nothing forwarded.
#[tokio::test]
async fn hostile_ssp_headers_are_refused() {
    let w = World::start().await;
    let base = || {
        ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap()
    };
    let mut dup = base();
    dup.headers_mut().append("ssp-from", FROM.parse().unwrap());
    let mut huge = base();
    huge.headers_mut()
        .insert("ssp-interactionid", "u".repeat(4096).parse().unwrap());
    let mut obs = base();
    obs.headers_mut().insert(
        "ssp-traceid",
        http::HeaderValue::from_bytes(b"629ea9ba-a077-4d99-b289-7a9b19fd4e0\xe9").unwrap(),
    );
    let mut huge_asid = base();
    huge_asid
        .headers_mut()
        .insert("ssp-to", "9".repeat(2048).parse().unwrap());
    for (req, header) in [
        (dup, "Ssp-From"),
        (huge, "Ssp-InteractionID"),
        (obs, "Ssp-TraceID"),
        (huge_asid, "Ssp-To"),
    ] {
        let a = within(header, w.consumer("consumer").fetch(req))
            .await
            .unwrap();
        a.assert_outcome(
            400,
            "invalid",
            &format!("MISSING_OR_INVALID_HEADER_{header}"),
        );
    }
    for line in [
        "Ssp-From: 2000\x0100359",
        "Ssp-From: 200000000359\rX: y",
        "Ssp-From\0: 1",
    ] {
        let request = format!(
            "GET /{}/fhir/metadata HTTP/1.1\r\nHost: ssp\r\n{line}\r\nConnection: close\r\n\r\n",
            w.url
        );
        assert_eq!(raw_status(&w, request.as_bytes()).await, 400, "{line:?}");
    }
    assert!(w.provider.seen().is_empty());
}

/// Huge, deeply nested, duplicate-key and wrongly typed tokens are each refused by name.
#[tokio::test]
async fn hostile_tokens_are_refused() {
    use base64::Engine;
    let w = World::start().await;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let header = b64(r#"{"alg":"none","typ":"JWT"}"#);
    let good = claims(&w.url, METADATA);
    let mut dup = good.to_string();
    dup.insert_str(1, r#""aud":"https://elsewhere.example/gp","#);
    let mut wrong_type = good.clone();
    wrong_type["iat"] = serde_json::json!(good["iat"].to_string());
    let tokens = [
        (
            format!(
                "{header}.{}.",
                b64(&format!(r#"{{"x":"{}"}}"#, "a".repeat(20_000)))
            ),
            "TOO_LARGE",
        ),
        (
            format!(
                "{header}.{}.",
                b64(&format!("{}1{}", "[".repeat(4000), "]".repeat(4000)))
            ),
            "MALFORMED",
        ),
        (format!("{header}.{}.", b64(&dup)), "DUPLICATE_KEY"),
        (ssp::jwt::encode_unsigned(&wrong_type), "INVALID_IAT"),
    ];
    for (token, name) in tokens {
        let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let a = within(name, w.consumer("consumer").fetch(req))
            .await
            .unwrap();
        a.assert_outcome(400, "invalid", &format!("INVALID_JWT_{name}"));
    }
    assert!(w.provider.seen().is_empty());
}

/// Hostile policy files are refused whole, each with a reason, and never crash the import.
#[test]
fn hostile_policy_files_are_refused() {
    use ssp::policy::{Policy, Source};
    let system = format!(
        "[[system]]\nasid = \"{FROM}\"\nname = \"A\"\nods = \"A1\"\nfqdn = \"a.example\"\ninteractions = [\"{METADATA}\"]\n"
    );
    let cases = [
        (
            "duplicate key",
            system.replace("name = \"A\"", "name = \"A\"\nname = \"B\""),
        ),
        (
            "wrong type",
            system.replace(&format!("asid = \"{FROM}\""), "asid = 200000000359"),
        ),
        ("unknown key", system.clone() + "admin = true\n"),
        (
            "deep nesting",
            format!("x = {}1{}\n", "[".repeat(100_000), "]".repeat(100_000)),
        ),
        (
            "deep tables",
            format!("x = {}1{}\n", "{a=".repeat(50_000), "}".repeat(50_000)),
        ),
        (
            "control character",
            system.replace("name = \"A\"", "name = \"A\u{1}\""),
        ),
        ("bad asid", system.replace(FROM, "2000-0000")),
        ("huge asid", system.replace(FROM, &"9".repeat(100_000))),
        ("duplicate system", system.clone() + &system),
        ("not toml", "\u{feff}[[system\n".to_owned()),
    ];
    for (what, text) in cases {
        let source = Source::from_files(vec![("hostile.toml".into(), text)]);
        match Policy::compile(&source, 1) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => assert!(!e.problems.is_empty(), "{what}: no reason"),
        }
    }
    // Not UTF-8 on disk: refused when read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), b"name = \"\xff\xfe\"\n").unwrap();
    assert!(Source::read_dir(dir.path()).is_err());
}

/// Plain HTTP sent to the TLS port gets a short plain-text 400 and a closed connection, not a hang.
#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_plain_answer() {
    let w = World::start().await;
    let mut tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
    tcp.write_all(b"GET /https://provider.dev.localhost/gp HTTP/1.1\r\nHost: ssp\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within("plain answer", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(body.len(), length);
    assert!(body.contains("TLS"));
    let metrics = w.metrics.render();
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"plaintext_http\"} 1"),
        "{metrics}"
    );
    // And TLS consumers are served as ever.
    let ok = within(
        "ok",
        w.consumer("consumer")
            .fetch(get_as(&w, FROM, "/fhir/metadata", &trace(1))),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, StatusCode::OK);
}
