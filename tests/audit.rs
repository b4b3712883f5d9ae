//! The transaction log through the running proxy: the records each request leaves, their fields and outcomes,
//! refusal with 503 when the log cannot be written, JWT claims and violations in the record, and the `ssp audit`
//! commands on a real log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use support::*;

fn only<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

/// A permitted request leaves a `request` record (written before forwarding) and a `response` record, with the
/// documented fields.
#[tokio::test]
async fn permitted_request_leaves_request_and_response_records() {
    let w = World::start().await;
    let path = format!("/{}/fhir/Patient/$gpc.getstructuredrecord/echo", w.url);
    let req = ssp_request(Method::POST, &path, STRUCTURED)
        .body(full("0123456789"))
        .unwrap();
    let answer = within("post", w.consumer("consumer").fetch(req))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);

    let records = w.records(2).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    let (req, resp) = (&records[0], &records[1]);
    assert_eq!(req["kind"], "request");
    assert_eq!(req["seq"], 1);
    assert_eq!(req["prev"], ssp::audit::GENESIS);
    assert_eq!(req["instance"], "test-instance");
    assert_eq!(req["trace_id"], TRACE_ID);
    assert_eq!(req["from"], FROM);
    assert_eq!(req["to"], TO);
    assert_eq!(req["interaction"], STRUCTURED);
    assert_eq!(req["method"], "POST");
    assert_eq!(req["target"], path[1..]);
    assert_eq!(req["decision"], "permit");
    assert_eq!(req["policy_generation"], 1);
    assert!(req["conn_id"].is_u64());
    assert!(
        req["ts"].as_str().unwrap().ends_with('Z') && req["ts"].as_str().unwrap().len() == 27,
        "{}",
        req["ts"]
    );
    let peer = &req["peer"];
    assert!(peer["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(peer["subject"].as_str().unwrap().contains(CONSUMER_NAME));
    assert_eq!(peer["fingerprint_sha256"].as_str().unwrap().len(), 64);
    assert!(!peer["serial"].as_str().unwrap().is_empty());
    let jwt = &req["jwt"];
    assert_eq!(jwt["valid"], true);
    assert_eq!(jwt["organization_ods"], "RXX01");
    assert_eq!(jwt["sds_user_id"], "111222333444");
    assert_eq!(jwt["sds_role_profile_id"], "444555666777");
    assert_eq!(jwt["reason_for_request"], "directcare");
    assert_eq!(jwt["requested_scope"], "patient/*.read");
    assert_eq!(jwt["aud"], w.url);
    assert_eq!(jwt["violations"], serde_json::json!([]));

    assert_eq!(resp["kind"], "response");
    assert_eq!(resp["seq"], 2);
    assert_eq!(resp["trace_id"], TRACE_ID);
    assert_eq!(resp["conn_id"], req["conn_id"]);
    assert_eq!(resp["status"], 201);
    assert_eq!(resp["bytes_in"], 10);
    assert_eq!(resp["bytes_out"], 10);
    assert_eq!(resp["outcome"], "ok");
    // Milliseconds to the microsecond: a loopback exchange takes well under one, and is not recorded as 0.
    let (upstream_ms, total_ms) = (
        resp["upstream_ms"].as_f64().unwrap(),
        resp["total_ms"].as_f64().unwrap(),
    );
    assert!(upstream_ms > 0.0 && total_ms >= upstream_ms, "{resp}");
    // Written as decimals (`0.412`, `2.0`), never whole milliseconds.
    assert!(
        resp["upstream_ms"].is_f64() && resp["total_ms"].is_f64(),
        "{resp}"
    );
    assert!(resp.get("retried").is_none(), "{resp}");
    assert!(ssp::audit::verify(&w.audit_dir()).is_ok());
}

/// A refused request leaves a `request` record with the decision and reason, and a `response` record with
/// outcome `denied`; the raw values it carried are recorded even when they did not parse.
#[tokio::test]
async fn denied_request_leaves_deny_records() {
    let w = World::start().await;
    let path = format!("/{}/fhir/Appointment/1", w.url);
    let mut bad_from = ssp_request(Method::GET, &path, METADATA);
    bad_from
        .headers_mut()
        .unwrap()
        .insert("Ssp-From", "not-digits".parse().unwrap());
    // A request target in absolute form (the provider's URL itself, not `/` and the URL) is refused, and recorded
    // as sent, host included.
    let absolute = format!("{}/fhir/metadata?x=1", w.url);
    let refused = [
        (
            ssp_request(Method::GET, &path, APPOINTMENT),
            StatusCode::FORBIDDEN,
        ),
        (bad_from, StatusCode::BAD_REQUEST),
        (
            ssp_request(Method::GET, &absolute, METADATA),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (request, status) in refused {
        let answer = within(
            "refused",
            w.consumer("consumer").fetch(request.body(empty()).unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, status);
    }

    let records = w.records(6).await;
    let requests = only(&records, "request");
    let responses = only(&records, "response");
    assert_eq!((requests.len(), responses.len()), (3, 3), "{records:#?}");
    assert_eq!(requests[2]["target"], absolute);
    assert_eq!(requests[2]["reason"], "INVALID_TARGET_URL");
    assert_eq!(requests[0]["decision"], "deny");
    assert_eq!(
        requests[0]["reason"],
        format!("ASID_CHECK_FAILED_MESSAGESENDER_{FROM}")
    );
    assert_eq!(requests[0]["interaction"], APPOINTMENT);
    assert_eq!(requests[0]["target"], path[1..]);
    assert_eq!(requests[1]["reason"], "MISSING_OR_INVALID_HEADER_Ssp-From");
    assert_eq!(requests[1]["from"], "not-digits");
    assert_eq!(responses[0]["status"], 403);
    assert_eq!(responses[0]["outcome"], "denied");
    assert_eq!(responses[1]["status"], 400);
    assert!(w.provider.seen().is_empty());
    assert!(ssp::audit::verify(&w.audit_dir()).is_ok());
}

/// A consumer that goes away mid-download leaves `client_closed`; a provider that cannot be reached leaves
/// `upstream_error` with the 502 the consumer got.
#[tokio::test]
async fn client_closed_and_upstream_error_outcomes() {
    let w = World::start().await;
    let response = w.get("/fhir/infinite").await;
    let mut body = response.into_body();
    within("frame", body.frame()).await.unwrap().unwrap();
    drop(body);
    within(
        "provider notices",
        w.provider.state.stream_broken.notified(),
    )
    .await;

    let target = format!(
        "https://provider2.dev.localhost:{}/gp/fhir/metadata",
        w.down.port()
    );
    let mut req = ssp_request(Method::GET, &format!("/{target}"), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut().insert("Ssp-To", TO_DOWN.parse().unwrap());
    assert_eq!(
        within("502", w.consumer("consumer").fetch(req))
            .await
            .unwrap()
            .status,
        StatusCode::BAD_GATEWAY
    );

    let records = w.records(4).await;
    let responses = only(&records, "response");
    assert_eq!(responses.len(), 2, "{records:#?}");
    let closed = responses
        .iter()
        .find(|r| r["outcome"] == "client_closed")
        .expect("client_closed record");
    assert_eq!(closed["status"], 200);
    assert!(closed["bytes_out"].as_u64().unwrap() > 0);
    let failed = responses
        .iter()
        .find(|r| r["outcome"] == "upstream_error")
        .expect("upstream_error record");
    assert_eq!(failed["status"], 502);
    assert_eq!(failed["to"], TO_DOWN);
}

/// An audit log that cannot be written once the proxy runs makes every request fail with 503 `AUDIT_UNAVAILABLE`,
/// and no request reaches the provider. (One that cannot be opened at start stops the start: `tests/binary.rs`.)
#[tokio::test]
async fn unwritable_audit_log_refuses_with_503() {
    // The folder replaced by a regular file fails the next segment, whoever runs the test (root included).
    let w = World::start_with(Setup {
        extra_audit: "segment_size = \"4KiB\"".into(),
        ..Setup::default()
    })
    .await;
    let seen = w.break_audit_log().await;
    for _ in 0..3 {
        let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap();
        let answer = within("503", w.consumer("consumer").fetch(req))
            .await
            .unwrap();
        answer.assert_outcome(503, "transient", "AUDIT_UNAVAILABLE");
    }
    assert_eq!(
        w.provider.seen().len(),
        seen,
        "a request reached the provider without its audit record"
    );
}

/// In `jwt.mode = "audit"` a bad token is forwarded and its violations are in the request record.
#[tokio::test]
async fn jwt_violations_are_recorded_in_audit_mode() {
    let w = World::start_with(Setup {
        jwt_mode: "audit",
        ..Setup::default()
    })
    .await;
    let mut c = claims(&w.url, METADATA);
    c["sub"] = "someone-else".into();
    c["exp"] = (c["iat"].as_i64().unwrap() + 299).into();
    let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("authorization", bearer(&c).parse().unwrap());
    assert_eq!(
        within("audit mode", w.consumer("consumer").fetch(req))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let records = w.records(2).await;
    let jwt = &records[0]["jwt"];
    assert_eq!(jwt["valid"], false);
    assert_eq!(
        jwt["violations"],
        serde_json::json!(["EXP_IAT_NOT_300", "SUB_NOT_PRACTITIONER_ID"])
    );
    assert_eq!(records[0]["decision"], "permit");
    assert_eq!(records[1]["outcome"], "ok");
}

/// In enforce mode the refused request's record carries what was read of the token.
#[tokio::test]
async fn jwt_refusal_record_carries_the_claims() {
    let w = World::start().await;
    let c = claims("https://elsewhere.example/gp", METADATA);
    let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut()
        .insert("authorization", bearer(&c).parse().unwrap());
    assert_eq!(
        within("enforce", w.consumer("consumer").fetch(req))
            .await
            .unwrap()
            .status,
        StatusCode::BAD_REQUEST
    );
    let records = w.records(2).await;
    assert_eq!(records[0]["reason"], "INVALID_JWT_AUD_MISMATCH");
    assert_eq!(records[0]["jwt"]["aud"], "https://elsewhere.example/gp");
    assert_eq!(records[0]["jwt"]["organization_ods"], "RXX01");
}

/// `ssp audit verify` exits 0 on the proxy's log and 1 naming the first bad record once a byte is edited;
/// `ssp audit query` filters and prints JSON lines or a table.
#[tokio::test]
async fn audit_commands_on_a_real_log() {
    let w = World::start().await;
    for interaction in [METADATA, APPOINTMENT, METADATA] {
        let req = ssp_request(Method::GET, &format!("/{}/fhir/x", w.url), interaction)
            .body(empty())
            .unwrap();
        within("request", w.consumer("consumer").fetch(req))
            .await
            .unwrap();
    }
    w.records(6).await;
    let dir = w.audit_dir().display().to_string();

    let (code, out) = ssp_cmd(&["audit", "verify", "--dir", &dir]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: 6 records"), "{out}");

    let (code, out) = ssp_cmd(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--outcome",
        "denied",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|r| r["interaction"] == APPOINTMENT));

    let (code, out) = ssp_cmd(&[
        "audit",
        "query",
        "--dir",
        &dir,
        "--interaction",
        METADATA,
        "--from",
        FROM,
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1 + 4, "{out}");
    assert!(out.lines().next().unwrap().starts_with("ts"));

    let (code, _) = ssp_cmd(&["audit", "query", "--dir", &dir, "--since", "yesterday"]);
    assert_eq!(code, 64);

    // Edit one byte of the third record.
    let segment = std::fs::read_dir(w.audit_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[2] = lines[2].replacen("\"GET\"", "\"PUT\"", 1);
    std::fs::write(&segment, lines.join("\n") + "\n").unwrap();
    let (code, out) = ssp_cmd(&["audit", "verify", "--dir", &dir]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("line 4 (seq 4)"),
        "the record after the edited one no longer chains: {out}"
    );
}

/// HTTP/2 streams reset as soon as they are sent: every request that got a `request` record gets its `response`
/// record too (`client_closed` when the consumer had gone), however early the reset came.
#[tokio::test]
async fn streams_reset_at_once_leave_both_records() {
    let w = World::start().await;
    let consumer = Consumer::new(&w.pki, Some("consumer"), w.proxy.addr, true);
    let mut sender = within("connect", consumer.connect()).await.unwrap();
    for i in 0..60u64 {
        let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap();
        req.headers_mut().insert(
            "ssp-traceid",
            format!("00000000-0000-4000-8000-{i:012}").parse().unwrap(),
        );
        // Dropped after a few microseconds to a millisecond: the stream is reset at every stage of its exchange.
        let _ = tokio::time::timeout(Duration::from_micros(20 * (i % 50)), sender.send(req)).await;
    }
    // A last, whole exchange: once its response record is there, so are those of every stream before it.
    let last = w.get("/fhir/metadata").await;
    assert_eq!(last.status(), StatusCode::OK);
    drain(last.into_body()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = ssp::audit::query(&w.audit_dir(), &ssp::audit::Filter::default()).unwrap();
        let traces = |kind: &str| -> std::collections::BTreeSet<String> {
            records
                .iter()
                .filter(|r| r["kind"] == kind)
                .filter_map(|r| r["trace_id"].as_str().map(str::to_owned))
                .collect()
        };
        let (requests, responses) = (traces("request"), traces("response"));
        let missing: Vec<_> = requests.difference(&responses).collect();
        if missing.is_empty() && requests.len() > 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "request records without a response record: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
