//! End-to-end behaviour of the proxy over real loopback sockets: TLS MA on both legs, each check of DESIGN.md 1.4
//! with its status and text, forwarding rules, streaming, timeouts and cancellation. The proxy runs in-process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, StatusCode, Version};
use http_body_util::BodyExt;
use support::*;

/// A permitted GET reaches the provider with the proxy's client certificate, every `Ssp-*` header and the token
/// unchanged, `Host` set to the target and `Forwarded` / `X-Forwarded-For` added; the consumer gets the
/// provider's status, headers and body.
#[tokio::test]
async fn permitted_get_is_forwarded_with_the_forwarding_headers() {
    let w = World::start().await;
    let path = format!("/{}/fhir/metadata", w.url);
    let req = ssp_request(Method::GET, &path, METADATA)
        .header("Connection", "X-Hop")
        .header("X-Hop", "must not pass")
        .header("X-Forwarded-For", "192.0.2.1")
        .body(empty())
        .unwrap();
    let token = req.headers()["authorization"].clone();
    let answer = within("get", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-provider"], "default");
    assert_eq!(answer.body, format!("provider saw /gp/fhir/metadata"));

    let seen = w.provider.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        s.client_cn.as_deref(),
        Some(PROXY_CLIENT_NAME),
        "provider must see the proxy's certificate"
    );
    assert_eq!(s.method, Method::GET);
    assert_eq!(s.version, Version::HTTP_11);
    assert_eq!(s.path_and_query, "/gp/fhir/metadata");
    assert_eq!(
        s.headers["host"],
        format!("provider.dev.localhost:{}", w.provider.addr.port())
    );
    assert_eq!(s.headers["ssp-traceid"], TRACE_ID);
    assert_eq!(s.headers["ssp-from"], FROM);
    assert_eq!(s.headers["ssp-to"], TO);
    assert_eq!(s.headers["ssp-interactionid"], METADATA);
    assert_eq!(s.headers["authorization"], token);
    assert_eq!(s.headers["forwarded"], "for=127.0.0.1;proto=https");
    assert_eq!(s.headers["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    assert!(
        !s.headers.contains_key("x-hop"),
        "a header named by Connection is hop-by-hop"
    );
}

/// A permitted POST's body reaches the provider and the provider's answer (status 201, its headers, the body)
/// comes back unchanged.
#[tokio::test]
async fn permitted_post_body_goes_through_both_ways() {
    let w = World::start().await;
    let path = format!("/{}/fhir/Patient/$gpc.getstructuredrecord/echo", w.url);
    let payload = r#"{"resourceType":"Parameters","parameter":[{"name":"patientNHSNumber"}]}"#;
    let req = ssp_request(Method::POST, &path, STRUCTURED)
        .header("content-type", "application/fhir+json")
        .body(full(payload))
        .unwrap();
    let answer = within("post", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.headers["x-provider"], "echo");
    assert_eq!(answer.headers["content-type"], "application/fhir+json");
    assert_eq!(answer.body, payload);
    let s = &w.provider.seen()[0];
    assert_eq!(s.method, Method::POST);
    assert_eq!(s.headers["content-type"], "application/fhir+json");
}

/// Percent-encoded paths and queries reach the provider byte for byte: no decoding, no re-encoding.
#[tokio::test]
async fn percent_encoding_reaches_the_provider_byte_for_byte() {
    let w = World::start().await;
    let tail = "/fhir/Patient/1/a%20b/~x%7E%3A?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286&q=a+b%2Bc&x=%E2%9C%93";
    let path = format!("/{}{tail}", w.url);
    let req = ssp_request(Method::GET, &path, METADATA)
        .body(empty())
        .unwrap();
    let answer = within("get", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(w.provider.seen()[0].path_and_query, format!("/gp{tail}"));
}

/// An HTTP/2 consumer is served, and its request goes upstream as HTTP/1.1.
#[tokio::test]
async fn http2_consumer_is_forwarded_as_http1() {
    let w = World::start().await;
    let consumer = Consumer::new(&w.pki, Some("consumer"), w.proxy.addr, true);
    let path = format!("/{}/fhir/echo", w.url);
    let req = ssp_request(Method::POST, &path, METADATA)
        .body(full("h2 body"))
        .unwrap();
    let response = within("h2", consumer.send(req)).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    let answer = Answer::read(response).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.body, "h2 body");
    let s = &w.provider.seen()[0];
    assert_eq!(s.version, Version::HTTP_11);
    assert_eq!(
        s.headers["host"],
        format!("provider.dev.localhost:{}", w.provider.addr.port())
    );
}

/// Keep-alive on both legs: three requests on one consumer connection use one pooled provider connection.
#[tokio::test]
async fn keep_alive_on_both_legs() {
    let w = World::start().await;
    let mut sender = within("connect", w.consumer("consumer").connect())
        .await
        .unwrap();
    for _ in 0..3 {
        let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap();
        let response = within("send", sender.send(req)).await.unwrap();
        assert_eq!(Answer::read(response).await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(w.provider.seen().len(), 3);
    assert_eq!(w.provider.state.connections.load(Ordering::SeqCst), 1);
}

// -------------------------------------------------------------------------------------------------------------
// Check 1: the TLS handshake.

/// A provider's response head is forwarded up to 60 KiB and 100 fields, and refused past either with a 502 naming
/// the target and a response record, the same way on a pooled provider connection and on a new one (each 502
/// drops the connection it came on, so a refusal repeated three times meets both); the consumer's connection
/// stays up throughout.
#[tokio::test]
async fn provider_response_heads_up_to_60_kib_and_100_fields_are_forwarded() {
    let w = World::start().await;
    let mut sender = w.consumer("consumer").connect().await.unwrap();
    // The test provider adds `content-type` and `content-length`: 98 fields of its own make 100.
    let cases = [
        ("bytes=59392", true),
        ("bytes=59392", true),
        ("bytes=62464", false),
        ("bytes=62464", false),
        ("bytes=62464", false),
        ("bytes=131072", false),
        ("fields=98", true),
        ("fields=98", true),
        ("fields=99", false),
        ("fields=99", false),
        ("bytes=100", true),
    ];
    for (query, fits) in cases {
        let path = format!("/{}/fhir/headers?{query}", w.url);
        let request = ssp_request(Method::GET, &path, METADATA)
            .body(empty())
            .unwrap();
        let response = within(query, sender.send(request)).await.unwrap();
        let answer = Answer::read(response).await.unwrap();
        if fits {
            assert_eq!(answer.status, StatusCode::OK, "{query}");
            assert_eq!(answer.body, "filled");
        } else {
            answer.assert_outcome(
                502,
                "transient",
                &format!(
                    "ERROR_COMMUNICATING_TO_ENDPOINT_URL_{}/fhir/headers?{query}",
                    w.url
                ),
            );
        }
    }
    let records = w.records(2 * cases.len()).await;
    let outcomes: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "response")
        .map(|r| r["outcome"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<_> = cases
        .iter()
        .map(|(_, fits)| if *fits { "ok" } else { "upstream_error" })
        .collect();
    assert_eq!(outcomes, expected);
}

async fn assert_refused(w: &World, consumer: Consumer, why: &str) {
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    // With TLS 1.3 the client learns of the refusal on its first read, so the error may surface at either step.
    let result = within("refused", consumer.fetch(req)).await;
    assert!(result.is_err(), "{why}: got {result:?}");
    assert!(
        w.provider.seen().is_empty(),
        "{why}: provider saw a request"
    );
}

/// Check 1: revoked, expired, untrusted and missing client certificates are refused in the handshake.
#[tokio::test]
async fn check_1_bad_client_certificates_fail_the_handshake() {
    let w = World::start().await;
    assert_refused(&w, w.consumer("consumer-revoked"), "revoked").await;
    assert_refused(&w, w.consumer("consumer-expired"), "expired").await;
    let stranger = Pki::generate();
    assert_refused(
        &w,
        Consumer::new(&stranger, Some("consumer"), w.proxy.addr, false),
        "untrusted CA",
    )
    .await;
    assert_refused(
        &w,
        Consumer::new(&w.pki, None, w.proxy.addr, false),
        "no certificate",
    )
    .await;
    // And the good certificate still works on the same proxy.
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    assert_eq!(
        within("ok", w.consumer("consumer").fetch(req))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
}

/// Check 1: with `tls_versions = ["1.2"]` a TLS 1.3-only client is refused and a TLS 1.2 client served.
#[tokio::test]
async fn check_1_tls_versions_are_enforced() {
    let w = World::start_with(Setup {
        tls_versions: r#"["1.2"]"#,
        ..Setup::default()
    })
    .await;
    let roots = ssp::tls::load_roots("ca", &w.pki.ca()).unwrap();
    let client = |version: &'static rustls::SupportedProtocolVersion| {
        rustls::ClientConfig::builder_with_provider(ssp::tls::provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                ssp::tls::load_certs("c", &w.pki.path("consumer.crt")).unwrap(),
                ssp::tls::load_key("k", &w.pki.path("consumer.key")).unwrap(),
            )
            .unwrap()
    };
    let connect = |config: rustls::ClientConfig| async move {
        let tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(w.proxy.addr.ip().into());
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
    };
    assert!(
        within("tls13", connect(client(&rustls::version::TLS13)))
            .await
            .is_err()
    );
    let tls12 = within("tls12", connect(client(&rustls::version::TLS12)))
        .await
        .unwrap();
    assert_eq!(
        tls12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

/// A client that opens TCP but never completes the handshake is disconnected after `handshake_timeout`.
#[tokio::test]
async fn stalled_handshake_is_cut() {
    use tokio::io::AsyncReadExt;
    let w = World::start_with(Setup {
        handshake_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = within("handshake timeout", tcp.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "expected the proxy to close the connection");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
}

/// A consumer that sends half a request head is disconnected after `header_read_timeout`.
#[tokio::test]
async fn slow_request_headers_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::start_with(Setup {
        header_read_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let consumer = w.consumer("consumer");
    let mut tls = within("tls", consumer.tls()).await;
    tls.write_all(b"GET /https://x HTTP/1.1\r\nHost: ssp\r\nSsp-From: 2")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = within("header read timeout", tls.read_to_end(&mut buf)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
    assert!(w.provider.seen().is_empty());
}

// -------------------------------------------------------------------------------------------------------------
// Checks 2 to 9.

async fn refused(w: &World, consumer: &str, req: http::Request<TestBody>) -> Answer {
    let answer = within("request", w.consumer(consumer).fetch(req))
        .await
        .unwrap();
    assert!(
        w.provider.seen().is_empty(),
        "the provider must see nothing of a refused request"
    );
    answer
}

/// Check 2: a method outside `server.methods` gets 405 with the documented text and an `Allow` header.
#[tokio::test]
async fn check_2_method() {
    let w = World::start().await;
    let req = ssp_request(
        Method::TRACE,
        &format!("/{}/fhir/metadata", w.url),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let a = refused(&w, "consumer", req).await;
    a.assert_outcome(405, "forbidden", "405: Method Not Allowed");
    assert_eq!(a.json()["issue"][0]["severity"], "fatal");
    assert_eq!(a.headers["allow"], "GET, POST, PUT, DELETE, PATCH");
    assert_eq!(a.headers["ssp-traceid"], TRACE_ID);
}

/// Check 3: targets that are not https, carry userinfo, dot segments or no host get 400 INVALID_TARGET_URL.
#[tokio::test]
async fn check_3_target_url() {
    let w = World::start().await;
    let port = w.provider.addr.port();
    for path in [
        format!("/http://provider.dev.localhost:{port}/gp/fhir/metadata"),
        format!("/https://user@provider.dev.localhost:{port}/gp/fhir/metadata"),
        format!("/https://provider.dev.localhost:{port}/gp/fhir/../../etc"),
        format!("/https://provider.dev.localhost:{port}/gp/%2e%2e/x"),
        format!("/https://provider.dev.localhost:{port}/gp/%2e%2e%2fadmin"),
        "/https:///gp".to_owned(),
        "/gp/fhir/metadata".to_owned(),
    ] {
        let req = ssp_request(Method::GET, &path, METADATA)
            .body(empty())
            .unwrap();
        refused(&w, "consumer", req)
            .await
            .assert_outcome(400, "invalid", "INVALID_TARGET_URL");
    }
}

/// Check 4: each missing or malformed `Ssp-*` header is named.
#[tokio::test]
async fn check_4_headers() {
    let w = World::start().await;
    let path = format!("/{}/fhir/metadata", w.url);
    let cases = [
        (
            "Ssp-TraceID",
            "not-a-guid",
            "MISSING_OR_INVALID_HEADER_Ssp-TraceID",
        ),
        (
            "Ssp-From",
            "20000000035x",
            "MISSING_OR_INVALID_HEADER_Ssp-From",
        ),
        ("Ssp-To", "", "MISSING_OR_INVALID_HEADER_Ssp-To"),
        (
            "Ssp-InteractionID",
            "metadata",
            "MISSING_OR_INVALID_HEADER_Ssp-InteractionID",
        ),
    ];
    for (name, value, text) in cases {
        let mut req = ssp_request(Method::GET, &path, METADATA)
            .body(empty())
            .unwrap();
        req.headers_mut().insert(name, value.parse().unwrap());
        refused(&w, "consumer", req)
            .await
            .assert_outcome(400, "invalid", text);
    }
    let mut req = ssp_request(Method::GET, &path, METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut().remove("Ssp-From");
    refused(&w, "consumer", req).await.assert_outcome(
        400,
        "invalid",
        "MISSING_OR_INVALID_HEADER_Ssp-From",
    );
}

/// Check 5: a certificate whose FQDN is not the one registered for `Ssp-From` gets 403.
#[tokio::test]
async fn check_5_certificate_fqdn() {
    let w = World::start().await;
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    refused(&w, "consumer2", req).await.assert_outcome(
        403,
        "forbidden",
        &format!("FQDN_CHECK_FAILED_MESSAGESENDER_{FROM}"),
    );
}

/// Check 6: a sender not accredited for the interaction, or unknown, gets 403.
#[tokio::test]
async fn check_6_sender_accreditation() {
    let w = World::start().await;
    let path = format!("/{}/fhir/Appointment/1", w.url);
    let req = ssp_request(Method::GET, &path, APPOINTMENT)
        .body(empty())
        .unwrap();
    refused(&w, "consumer", req).await.assert_outcome(
        403,
        "forbidden",
        &format!("ASID_CHECK_FAILED_MESSAGESENDER_{FROM}"),
    );
    let mut req = ssp_request(Method::GET, &path, METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("Ssp-From", "100000000001".parse().unwrap());
    refused(&w, "consumer", req).await.assert_outcome(
        403,
        "forbidden",
        "ASID_CHECK_FAILED_MESSAGESENDER_100000000001",
    );
}

/// Check 7: a receiver that is unknown or does not handle the interaction gets 403.
#[tokio::test]
async fn check_7_receiver_interaction() {
    let w = World::start().await;
    let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("Ssp-To", "999999999999".parse().unwrap());
    refused(&w, "consumer", req).await.assert_outcome(
        403,
        "forbidden",
        "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999",
    );
    // TO_DOWN exists but handles only metadata.
    let mut req = ssp_request(Method::POST, &format!("/{}/x", w.url), STRUCTURED)
        .body(empty())
        .unwrap();
    req.headers_mut().insert("Ssp-To", TO_DOWN.parse().unwrap());
    refused(&w, "consumer", req).await.assert_outcome(
        403,
        "forbidden",
        &format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{TO_DOWN}"),
    );
}

/// Check 8: without a data-sharing agreement from -> to, 403.
#[tokio::test]
async fn check_8_agreement() {
    let w = World::start().await;
    let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("Ssp-From", FROM_2.parse().unwrap());
    refused(&w, "consumer2", req).await.assert_outcome(
        403,
        "forbidden",
        &format!("FOT_CHECK_FAILED_MESSAGESENDER_{FROM_2}_MESSAGERECEIVER_{TO}"),
    );
}

/// Check 9: a target that does not continue the registered URL exactly (an IP for the host, another host the
/// proxy could reach) gets 400, and that host is never contacted: the proxy is not an open relay.
#[tokio::test]
async fn check_9_endpoint_url_and_no_open_relay() {
    // A second provider that the config can resolve but the policy does not register.
    let rogue_pki = Pki::generate();
    let rogue = Provider::start(&rogue_pki).await;
    let setup = Setup {
        extra_resolve: format!(
            "\"rogue.dev.localhost:{}\" = \"{}\"",
            rogue.addr.port(),
            rogue.addr
        ),
        ..Setup::default()
    };
    let w = World::start_with(setup).await;
    let port = w.provider.addr.port();
    let targets = [
        format!("https://127.0.0.1:{port}/gp/fhir/metadata"),
        format!("https://provider.dev.localhost:{port}/gpx/fhir/metadata"),
        format!(
            "https://rogue.dev.localhost:{}/gp/fhir/metadata",
            rogue.addr.port()
        ),
    ];
    for target in targets {
        let req = ssp_request(Method::GET, &format!("/{target}"), METADATA)
            .body(empty())
            .unwrap();
        refused(&w, "consumer", req).await.assert_outcome(
            400,
            "invalid",
            &format!(
                "ENDPOINT_{}_CPAID_S20001A000123_VARIES_FROM_TARGETURL_{target}",
                w.url
            ),
        );
    }
    assert_eq!(
        rogue.state.connections.load(Ordering::SeqCst),
        0,
        "an unregistered host was contacted"
    );
}

/// Refusals come as FHIR XML when the consumer prefers it.
#[tokio::test]
async fn refusal_in_xml_when_preferred() {
    let w = World::start().await;
    let req = ssp_request(
        Method::GET,
        &format!("/{}/fhir/Appointment/1", w.url),
        APPOINTMENT,
    )
    .header("accept", "application/fhir+xml")
    .body(empty())
    .unwrap();
    let a = refused(&w, "consumer", req).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+xml")
    );
    assert_eq!(a.headers["cache-control"], "no-store");
    let xml = String::from_utf8(a.body.to_vec()).unwrap();
    assert!(
        xml.contains(&format!(
            r#"<display value="ASID_CHECK_FAILED_MESSAGESENDER_{FROM}"/>"#
        )),
        "{xml}"
    );
    assert!(xml.contains(r#"<code value="forbidden"/>"#));
}

// -------------------------------------------------------------------------------------------------------------
// Upstream failures, streaming, cancellation.

/// A registered provider that is down gets 502 with the documented text.
#[tokio::test]
async fn provider_down_is_502() {
    let w = World::start().await;
    let target = format!(
        "https://provider2.dev.localhost:{}/gp/fhir/metadata",
        w.down.port()
    );
    let mut req = ssp_request(Method::GET, &format!("/{target}"), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut().insert("Ssp-To", TO_DOWN.parse().unwrap());
    let a = within("502", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    a.assert_outcome(
        502,
        "transient",
        &format!("ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    assert_eq!(a.headers["ssp-traceid"], TRACE_ID);
}

/// A provider silent past `response_timeout` gets 504 with the documented text.
#[tokio::test]
async fn provider_silent_is_504() {
    let w = World::start_with(Setup {
        response_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let target = format!("{}/fhir/silent", w.url);
    let req = ssp_request(Method::GET, &format!("/{target}"), METADATA)
        .body(empty())
        .unwrap();
    let started = std::time::Instant::now();
    let a = within("504", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    a.assert_outcome(
        504,
        "transient",
        &format!("TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}"),
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A provider that goes quiet mid-body past `body_idle_timeout` has its stream cut: the consumer sees the bytes
/// so far and then an error, not a clean end.
#[tokio::test]
async fn provider_stalling_mid_body_is_cut_after_the_idle_timeout() {
    let w = World::start_with(Setup {
        body_idle_timeout: "1s",
        ..Setup::default()
    })
    .await;
    let response = w.get("/fhir/stall").await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = within("first", body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "partial");
    let end = within("end", body.frame()).await;
    assert!(
        matches!(end, Some(Err(_))),
        "expected a broken stream, got {end:?}"
    );
}

/// The first bytes of a slow chunked response reach the consumer before the provider has finished.
#[tokio::test]
async fn slow_response_streams_before_the_provider_finishes() {
    let w = World::start().await;
    let response = w.get("/fhir/slow").await;
    let mut body = response.into_body();
    // The provider holds its last chunk until released, so this frame can only arrive if the proxy streams.
    let first = within(
        "first chunk while the provider is still sending",
        body.frame(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.into_data().unwrap(), "first,");
    w.provider.state.release_slow.notify_one();
    let rest = within("rest", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest, "last");
}

/// A consumer that disconnects mid-download makes the proxy drop the provider's connection.
#[tokio::test]
async fn consumer_disconnect_cancels_the_upstream_exchange() {
    let w = World::start().await;
    let response = w.get("/fhir/infinite").await;
    let mut body = response.into_body();
    let mut got = 0;
    while got < 256 * 1024 {
        got += within("frame", body.frame())
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
    }
    assert_eq!(w.provider.state.broken.load(Ordering::SeqCst), 0);
    drop(body); // closes the consumer connection (its task ends with the body and sender)
    within(
        "provider notices",
        w.provider.state.stream_broken.notified(),
    )
    .await;
    assert_eq!(w.provider.state.broken.load(Ordering::SeqCst), 1);
}

/// A large upload streams through to the provider intact (counted, not buffered, on both ends).
#[tokio::test]
async fn upload_streams_through() {
    let w = World::start().await;
    let len = 32 * 1024 * 1024 + 17;
    let req = ssp_request(Method::POST, &format!("/{}/fhir/upload", w.url), STRUCTURED)
        .body(RepeatBody::new(len, false).boxed())
        .unwrap();
    let a = within("upload", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, len.to_string());
    assert_eq!(w.provider.state.uploaded.load(Ordering::SeqCst), len);
}

/// A refused HEAD gets the refusal's status and header fields, `Content-Length` of the OperationOutcome included,
/// and no content (RFC 9110 section 9.3.2): over HTTP/2, where content on a HEAD response is a protocol error, and
/// over HTTP/1.1.
#[tokio::test]
async fn a_refused_head_has_no_content() {
    let w = World::start().await;
    for h2 in [true, false] {
        let consumer = Consumer::new(&w.pki, Some("consumer"), w.proxy.addr, h2);
        let mut sender = within("connect", consumer.connect()).await.unwrap();
        let req = ssp_request(Method::HEAD, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap();
        let response = within("head", sender.send(req)).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "h2: {h2}"
        );
        assert_eq!(response.headers()["allow"], "GET, POST, PUT, DELETE, PATCH");
        let length: usize = response.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(length > 100, "the OperationOutcome's length: {length}");
        let body = within("body", drain(response.into_body())).await;
        assert_eq!(body.unwrap(), 0, "h2: {h2}");
    }
}
