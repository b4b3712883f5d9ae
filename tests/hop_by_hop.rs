//! What is checked is what is forwarded: the fields a consumer's `Connection` names are removed before the
//! checks, and an HTTP/2 consumer's split `cookie` fields reach the provider as one. Loopback only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use http::{Method, StatusCode};
use support::*;
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------------------------------------------
// What `Connection` names is removed before the checks.

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
