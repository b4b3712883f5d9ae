//! Check 10 through the running proxy: the consumer's audit token in each `jwt.mode`, and signed tokens for a
//! system that registers keys.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use http::{Method, StatusCode};
use support::*;

fn metadata_request(
    w: &World,
    from: &str,
    authorization: Option<String>,
) -> http::Request<TestBody> {
    let mut req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    req.headers_mut().insert("Ssp-From", from.parse().unwrap());
    match authorization {
        Some(value) => req
            .headers_mut()
            .insert("authorization", value.parse().unwrap()),
        None => req.headers_mut().remove("authorization"),
    };
    req
}

fn expired(w: &World) -> serde_json::Value {
    let mut c = claims(&w.url, METADATA);
    let iat = c["iat"].as_i64().unwrap() - 600;
    c["iat"] = iat.into();
    c["exp"] = (iat + 300).into();
    c
}

/// Enforce mode: a bad or missing token is refused with 400 `INVALID_JWT_<REASON>` and the provider sees nothing.
#[tokio::test]
async fn enforce_mode_refuses_bad_tokens() {
    let w = World::start().await;
    let cases = [
        (Some(bearer(&expired(&w))), "INVALID_JWT_EXPIRED"),
        (None, "INVALID_JWT_MISSING_TOKEN"),
        (
            Some("Bearer {\"alg\":\"none\"}.{}.".to_owned()),
            "INVALID_JWT_MALFORMED",
        ),
        (
            Some(bearer(&{
                let mut c = claims(&w.url, METADATA);
                c["sub"] = "someone-else".into();
                c
            })),
            "INVALID_JWT_SUB_NOT_PRACTITIONER_ID",
        ),
        (
            Some(bearer(&claims("https://elsewhere.example/gp", METADATA))),
            "INVALID_JWT_AUD_MISMATCH",
        ),
    ];
    for (authorization, text) in cases {
        let answer = within(
            "jwt",
            w.consumer("consumer")
                .fetch(metadata_request(&w, FROM, authorization)),
        )
        .await
        .unwrap();
        answer.assert_outcome(400, "invalid", text);
        assert_eq!(answer.headers["ssp-traceid"], TRACE_ID);
    }
    assert!(
        w.provider.seen().is_empty(),
        "a request with a bad token reached the provider"
    );
    let good = metadata_request(&w, FROM, Some(bearer(&claims(&w.url, METADATA))));
    assert_eq!(
        within("good", w.consumer("consumer").fetch(good))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
}

/// RFC 6750 allows one or more spaces after `Bearer`: two are permitted; a TAB is a malformed field, not a
/// missing one.
#[tokio::test]
async fn bearer_takes_one_or_more_spaces() {
    let w = World::start().await;
    let token = ssp::jwt::encode_unsigned(&claims(&w.url, METADATA));
    let two_spaces = metadata_request(&w, FROM, Some(format!("Bearer  {token}")));
    assert_eq!(
        within("two spaces", w.consumer("consumer").fetch(two_spaces))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let tab = metadata_request(&w, FROM, Some(format!("Bearer\t{token}")));
    within("tab", w.consumer("consumer").fetch(tab))
        .await
        .unwrap()
        .assert_outcome(400, "invalid", "INVALID_JWT_MALFORMED");
    assert_eq!(w.provider.seen().len(), 1);
}

/// `Authorization` is a singleton field: a second line, before or after a good one, is a malformed token, so that
/// the provider cannot read a token ssp did not check.
#[tokio::test]
async fn a_repeated_authorization_field_is_malformed() {
    let w = World::start().await;
    let good = bearer(&claims(&w.url, METADATA));
    for lines in [
        [good.as_str(), "Bearer garbage"],
        ["Bearer garbage", good.as_str()],
        [good.as_str(), good.as_str()],
    ] {
        let mut req = metadata_request(&w, FROM, None);
        for line in lines {
            req.headers_mut()
                .append("authorization", line.parse().unwrap());
        }
        within("repeated", w.consumer("consumer").fetch(req))
            .await
            .unwrap()
            .assert_outcome(400, "invalid", "INVALID_JWT_MALFORMED");
    }
    assert!(
        w.provider.seen().is_empty(),
        "a repeated token reached the provider"
    );
}

/// Audit mode: a bad token is forwarded, unchanged.
#[tokio::test]
async fn audit_mode_forwards_bad_tokens() {
    let w = World::start_with(Setup {
        jwt_mode: "audit",
        ..Setup::default()
    })
    .await;
    let token = bearer(&expired(&w));
    let answer = within(
        "audit",
        w.consumer("consumer")
            .fetch(metadata_request(&w, FROM, Some(token.clone()))),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        w.provider.seen()[0].headers["authorization"],
        token.as_str()
    );
}

/// Off mode: no token at all is forwarded.
#[tokio::test]
async fn off_mode_does_not_look_at_tokens() {
    let w = World::start_with(Setup {
        jwt_mode: "off",
        ..Setup::default()
    })
    .await;
    let answer = within(
        "off",
        w.consumer("consumer")
            .fetch(metadata_request(&w, FROM, None)),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(!w.provider.seen()[0].headers.contains_key("authorization"));
}

fn signed(claims: &serde_json::Value, key_pem: &[u8]) -> String {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(key_pem).unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        claims,
        &key,
    )
    .unwrap();
    format!("Bearer {token}")
}

/// A system that registers a key must sign its tokens with it: a good signature passes, another key's signature
/// or an unsigned token is refused.
#[tokio::test]
async fn signed_token_system() {
    let w = World::start().await;
    let key = std::fs::read(w.pki.dir.path().join("certs/jwt-signing.key")).unwrap();
    let c = claims(&w.url, METADATA);

    let good = metadata_request(&w, FROM_SIGNED, Some(signed(&c, &key)));
    let answer = within("signed", w.consumer("consumer").fetch(good))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);

    let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let forged = metadata_request(&w, FROM_SIGNED, Some(signed(&c, other_key.as_bytes())));
    within("forged", w.consumer("consumer").fetch(forged))
        .await
        .unwrap()
        .assert_outcome(400, "invalid", "INVALID_JWT_BAD_SIGNATURE");

    let unsigned = metadata_request(&w, FROM_SIGNED, Some(bearer(&c)));
    within("unsigned", w.consumer("consumer").fetch(unsigned))
        .await
        .unwrap()
        .assert_outcome(400, "invalid", "INVALID_JWT_SIGNATURE_REQUIRED");

    // Signed claims are still validated.
    let stale = metadata_request(&w, FROM_SIGNED, Some(signed(&expired(&w), &key)));
    within("stale", w.consumer("consumer").fetch(stale))
        .await
        .unwrap()
        .assert_outcome(400, "invalid", "INVALID_JWT_EXPIRED");
    assert_eq!(
        w.provider.seen().len(),
        1,
        "only the good signed request may reach the provider"
    );
}
