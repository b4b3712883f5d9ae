//! Onboarding: `ssp onboard check` gives the proxy's own answer for every refusal reason (the same request sent
//! through the running proxy and given to the command), names the values to fix, reads PEM and PKCS#12 chains and
//! raw header blocks; `GET /_ssp/selftest` over curl gives the command's verdict for the same certificate and
//! headers; the credential radar shows a certificate expiring in 5 days in the gauge, the report and the alert.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use http::{HeaderMap, Method, Request};
use support::*;

/// A certificate for `names` issued by the PKI's CA (or by `issuer`), written as `<stem>.crt` / `<stem>.key`.
fn issue(pki: &Pki, stem: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) {
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let ca =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CONSUMER_NAME);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    edit(&mut params);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &ca).unwrap();
    std::fs::write(pki.path(&format!("{stem}.crt")), leaf.pem()).unwrap();
    std::fs::write(pki.path(&format!("{stem}.key")), leaf_key.serialize_pem()).unwrap();
}

/// A consumer certificate issued by an intermediate CA under the PKI's root: `<stem>.crt` holds the leaf and the
/// intermediate, `<stem>-leaf.crt` the leaf alone.
fn issue_via_intermediate(pki: &Pki, stem: &str) {
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let root =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "ssp test intermediate");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.use_authority_key_identifier_extension = true;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.signed_by(&ca_key, &root).unwrap();
    let intermediate = rcgen::Issuer::new(ca, ca_key);
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CONSUMER_NAME);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &intermediate).unwrap();
    std::fs::write(
        pki.path(&format!("{stem}.crt")),
        leaf.pem() + &ca_cert.pem(),
    )
    .unwrap();
    std::fs::write(pki.path(&format!("{stem}-leaf.crt")), leaf.pem()).unwrap();
    std::fs::write(pki.path(&format!("{stem}.key")), leaf_key.serialize_pem()).unwrap();
}

/// The request as an HTTP/1.1 header block, as `--header-file` reads it.
fn header_block(req: &Request<TestBody>) -> String {
    let mut text = format!("{} {} HTTP/1.1\r\n", req.method(), req.uri());
    for (name, value) in req.headers() {
        text.push_str(&format!("{}: {}\r\n", name, value.to_str().unwrap()));
    }
    text + "\r\n"
}

/// `ssp onboard check --format json` for this certificate and request; the exit code and the verdict.
fn onboard(
    w: &World,
    cert: &str,
    req: &Request<TestBody>,
    extra: &[&str],
) -> (i32, serde_json::Value) {
    let file = w.pki.dir.path().join("request.txt");
    std::fs::write(&file, header_block(req)).unwrap();
    let config = w.pki.dir.path().join("ssp.toml");
    let mut args = vec![
        "onboard",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--cert",
        cert,
        "--header-file",
        file.to_str().unwrap(),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let (code, out) = ssp_cmd(&args);
    let json = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no verdict: {out}"));
    (code, serde_json::from_str(json).unwrap())
}

fn request(w: &World, method: Method, tail: &str, interaction: &str) -> http::request::Builder {
    ssp_request(method, &format!("/{}{tail}", w.url), interaction)
}

fn build(builder: http::request::Builder, edit: impl FnOnce(&mut HeaderMap)) -> Request<TestBody> {
    let mut req = builder.body(empty()).unwrap();
    edit(req.headers_mut());
    req
}

fn token(claims: serde_json::Value) -> http::HeaderValue {
    bearer(&claims).parse().unwrap()
}

/// A certificate stem, a request, and the proxy's answer (`None`: forwarded).
type Case = (&'static str, Request<TestBody>, Option<(u16, String)>);

/// Every refusal reason of checks 2 to 10: the proxy's status and text are the command's, for the same request.
#[tokio::test]
async fn the_command_and_the_proxy_refuse_alike_for_every_reason() {
    let w = World::start().await;
    let port = w
        .url
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let metadata = claims(&w.url, METADATA);
    let mut exp_iat = metadata.clone();
    exp_iat["exp"] = (exp_iat["iat"].as_i64().unwrap() + 301).into();
    let mut expired = metadata.clone();
    expired["iat"] = (expired["iat"].as_i64().unwrap() - 1000).into();
    expired["exp"] = (expired["iat"].as_i64().unwrap() + 300).into();
    let mut no_org = metadata.clone();
    no_org
        .as_object_mut()
        .unwrap()
        .remove("requesting_organization");
    let cases: Vec<Case> = vec![
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |_| {}),
            None,
        ),
        (
            "consumer",
            build(request(&w, Method::OPTIONS, "/metadata", METADATA), |_| {}),
            Some((405, "405: Method Not Allowed".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/a/../metadata", METADATA), |_| {}),
            Some((400, "INVALID_TARGET_URL".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.remove("ssp-interactionid");
            }),
            Some((400, "MISSING_OR_INVALID_HEADER_Ssp-InteractionID".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.append("ssp-from", FROM.parse().unwrap());
            }),
            Some((400, "MISSING_OR_INVALID_HEADER_Ssp-From".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("connection", "keep-alive, Ssp-To".parse().unwrap());
            }),
            Some((400, "MISSING_OR_INVALID_HEADER_Ssp-To".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                // Over the default limit of 90 fields, under hyper's own bound of 100.
                for i in 0..85 {
                    h.insert(
                        http::HeaderName::try_from(format!("x-extra-{i}")).unwrap(),
                        "1".parse().unwrap(),
                    );
                }
            }),
            Some((431, "REQUEST_HEADER_FIELDS_TOO_LARGE".into())),
        ),
        (
            "consumer2",
            build(request(&w, Method::GET, "/metadata", METADATA), |_| {}),
            Some((403, format!("FQDN_CHECK_FAILED_MESSAGESENDER_{FROM}"))),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("ssp-from", "200000000999".parse().unwrap());
            }),
            Some((403, "ASID_CHECK_FAILED_MESSAGESENDER_200000000999".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", STRUCTURED), |h| {
                h.insert("ssp-to", TO_DOWN.parse().unwrap());
            }),
            Some((
                403,
                format!("PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{TO_DOWN}"),
            )),
        ),
        (
            "consumer2",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("ssp-from", FROM_2.parse().unwrap());
            }),
            Some((
                403,
                format!("FOT_CHECK_FAILED_MESSAGESENDER_{FROM_2}_MESSAGERECEIVER_{TO}"),
            )),
        ),
        (
            "consumer",
            build(
                ssp_request(
                    Method::GET,
                    &format!("/https://provider.dev.localhost:{port}/gpx/metadata"),
                    METADATA,
                ),
                |_| {},
            ),
            Some((
                400,
                format!(
                    "ENDPOINT_{}_CPAID_S20001A000123_VARIES_FROM_TARGETURL_https://provider.dev.localhost:{port}/gpx/metadata",
                    w.url
                ),
            )),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("authorization", token(exp_iat.clone()));
            }),
            Some((400, "INVALID_JWT_EXP_IAT_NOT_300".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("authorization", token(expired.clone()));
            }),
            Some((400, "INVALID_JWT_EXPIRED".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.insert("authorization", token(no_org.clone()));
            }),
            Some((400, "INVALID_JWT_MISSING_REQUESTING_ORGANIZATION".into())),
        ),
        (
            "consumer",
            build(request(&w, Method::GET, "/metadata", METADATA), |h| {
                h.remove("authorization");
            }),
            Some((400, "INVALID_JWT_MISSING_TOKEN".into())),
        ),
    ];
    for (stem, req, expected) in cases {
        let what = format!("{stem} {} {}: {:?}", req.method(), req.uri(), expected);
        let cert = w.pki.path(&format!("{stem}.crt"));
        let (code, verdict) = onboard(&w, cert.to_str().unwrap(), &req, &[]);
        let answer = within("a request", w.consumer(stem).fetch(req))
            .await
            .unwrap();
        match expected {
            None => {
                assert_eq!(answer.status, 200, "{what}");
                assert_eq!(code, 0, "{what}: {verdict}");
                assert_eq!(verdict["verdict"], "pass", "{what}");
                assert!(verdict["refusal"].is_null(), "{what}");
            }
            Some((status, text)) => {
                let outcome = answer.json();
                assert_eq!(answer.status.as_u16(), status, "{what}");
                assert_eq!(outcome["issue"][0]["diagnostics"], text.as_str(), "{what}");
                assert_eq!(code, 1, "{what}: {verdict}");
                assert_eq!(verdict["refusal"]["status"], status, "{what}: {verdict}");
                assert_eq!(
                    verdict["refusal"]["text"],
                    text.as_str(),
                    "{what}: {verdict}"
                );
            }
        }
    }
}

/// Check 1: each refused certificate is refused by the handshake for the reason the command gives (the
/// handshake failure counter's label), and the command names what to fix.
#[tokio::test]
async fn refused_certificates_are_named_with_their_fix() {
    let w = World::start().await;
    issue(&w.pki, "consumer-future", |p| {
        p.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(400);
    });
    issue(&w.pki, "consumer-server-eku", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    issue_via_intermediate(&w.pki, "consumer-via");
    let req = build(request(&w, Method::GET, "/metadata", METADATA), |_| {});
    let ca_crl = w.pki.path("ca.crl").display().to_string();
    for (stem, reason, fix) in [
        (
            "consumer-expired",
            "certificate_expired",
            "the certificate expired at 20".to_owned(),
        ),
        (
            "consumer-revoked",
            "certificate_revoked",
            format!("is revoked by CRL {ca_crl}"),
        ),
        (
            "consumer-future",
            "certificate_not_yet_valid",
            "the certificate is valid only from 20".to_owned(),
        ),
        (
            "consumer-via-leaf",
            "unknown_issuer",
            "lacks the certificate of its issuer CN=ssp test intermediate".to_owned(),
        ),
        (
            "consumer-server-eku",
            "certificate_invalid",
            "lacks TLS client authentication (clientAuth".to_owned(),
        ),
        // Complete, but server.crl holds only the root's CRL: the intermediate's certificates have no known status.
        (
            "consumer-via",
            "certificate_invalid",
            "no CRL in server.crl is from the certificate's issuer CN=ssp test intermediate"
                .to_owned(),
        ),
    ] {
        let before = metric_value(
            w.admin,
            &format!("ssp_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
        )
        .await;
        let key_stem = stem.strip_suffix("-leaf").unwrap_or(stem);
        if key_stem != stem {
            std::fs::copy(
                w.pki.path(&format!("{key_stem}.key")),
                w.pki.path(&format!("{stem}.key")),
            )
            .unwrap();
        }
        let sent = within(
            "a handshake",
            w.consumer(stem).fetch(build(
                request(&w, Method::GET, "/metadata", METADATA),
                |_| {},
            )),
        )
        .await;
        assert!(sent.is_err(), "{stem}: the handshake was accepted");
        // The client may see the refusal before the server has counted it.
        let series = format!("ssp_tls_handshake_failures_total{{reason=\"{reason}\"}}");
        let deadline = std::time::Instant::now() + STEP;
        while metric_value(w.admin, &series).await != before + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{stem}: the proxy's reason is not {reason}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (code, verdict) = onboard(
            &w,
            w.pki.path(&format!("{stem}.crt")).to_str().unwrap(),
            &req,
            &[],
        );
        assert_eq!(code, 1, "{stem}: {verdict}");
        assert_eq!(verdict["refusal"]["handshake"], reason, "{stem}: {verdict}");
        let first = &verdict["checks"][0];
        assert_eq!(first["result"], "fail");
        let fixes = first["fixes"].to_string();
        assert!(fixes.contains(&fix), "{stem}: {fixes} lacks {fix:?}");
        // The checks after the certificate still ran.
        assert_eq!(verdict["checks"][9]["result"], "pass", "{stem}: {verdict}");
    }
}

/// The text report names each value to fix; a PKCS#12 file gives the PEM chain's verdict; the token is never
/// printed; bad input exits 64.
#[tokio::test]
async fn the_text_report_names_the_values_and_the_inputs_are_checked() {
    let w = World::start().await;
    let config = w.pki.dir.path().join("ssp.toml");
    let config = config.to_str().unwrap();
    let cert = w.pki.path("consumer2.crt");
    let mut claims = claims(&w.url, METADATA);
    claims["exp"] = (claims["iat"].as_i64().unwrap() + 301).into();
    let token = ssp::jwt::encode_unsigned(&claims);
    let target = format!(
        "https://provider.dev.localhost:443{}",
        &w.url["https://provider.dev.localhost".len()..]
    );
    let args = [
        "onboard",
        "check",
        "--config",
        config,
        "--cert",
        cert.to_str().unwrap(),
        "--from",
        FROM,
        "--to",
        TO,
        "--interaction",
        STRUCTURED,
        "--target",
        &target,
        "--token",
        &token,
    ];
    let (code, out) = ssp_cmd(&args);
    assert_eq!(code, 1, "{out}");
    for expected in [
        format!(
            "the certificate names {CONSUMER2_NAME}, not {CONSUMER_NAME}, the FQDN registered for {FROM}"
        ),
        format!("proxy answers: 403 FQDN_CHECK_FAILED_MESSAGESENDER_{FROM}"),
        "exp - iat is 301 (must be 300)".to_owned(),
        "verdict: FAIL".to_owned(),
    ] {
        assert!(out.contains(&expected), "{expected:?} not in:\n{out}");
    }
    assert!(!out.contains(&token), "the token was printed:\n{out}");
    // A target with a port the registered URL does not have: the registered URL is named.
    let wrong_port = "https://provider.dev.localhost:4433/gp/metadata".to_owned();
    let (_, out) = ssp_cmd(&[
        "onboard",
        "check",
        "--config",
        config,
        "--cert",
        w.pki.path("consumer.crt").to_str().unwrap(),
        "--from",
        FROM,
        "--to",
        TO,
        "--interaction",
        METADATA,
        "--target",
        &wrong_port,
    ]);
    assert!(
        out.contains(&format!(
            "is not the registered https://provider.dev.localhost:{}",
            &w.url["https://provider.dev.localhost:".len()..]
                .split('/')
                .next()
                .unwrap()
        )),
        "{out}"
    );

    // PKCS#12 (no key), through openssl as an integrator would make it.
    let p12 = w.pki.dir.path().join("consumer.p12");
    let password = w.pki.dir.path().join("p12-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "pkcs12",
            "-export",
            "-nokeys",
            "-passout",
            "pass:s3cret",
            "-in",
        ])
        .arg(w.pki.path("consumer.crt"))
        .arg("-out")
        .arg(&p12)
        .status()
        .unwrap();
    assert!(made.success());
    let req = build(request(&w, Method::GET, "/metadata", METADATA), |_| {});
    let (pem_code, pem) = onboard(&w, w.pki.path("consumer.crt").to_str().unwrap(), &req, &[]);
    let (p12_code, from_p12) = onboard(
        &w,
        p12.to_str().unwrap(),
        &req,
        &["--password-file", password.to_str().unwrap()],
    );
    assert_eq!((pem_code, p12_code), (0, 0), "{from_p12}");
    assert_eq!(pem["checks"][0]["detail"], from_p12["checks"][0]["detail"]);
    // Bad input: a wrong password, a file that is no certificate, no target.
    std::fs::write(&password, "wrong\n").unwrap();
    let (code, out) = ssp_cmd(&[
        "onboard",
        "check",
        "--config",
        config,
        "--cert",
        p12.to_str().unwrap(),
        "--password-file",
        password.to_str().unwrap(),
        "--target",
        &w.url,
    ]);
    assert_eq!(code, 64, "{out}");
    let (code, out) = ssp_cmd(&[
        "onboard", "check", "--config", config, "--cert", config, "--target", &w.url,
    ]);
    assert_eq!(code, 64, "{out}");
    let (code, out) = ssp_cmd(&[
        "onboard",
        "check",
        "--config",
        config,
        "--cert",
        w.pki.path("consumer.crt").to_str().unwrap(),
    ]);
    assert_eq!(code, 64, "{out}");
}

/// `GET /_ssp/selftest` over curl gives the command's verdict for the same certificate and headers, writes a
/// `selftest` record, forwards nothing; with `server.selftest` off the path is an invalid target as before.
#[tokio::test]
async fn the_live_selftest_over_curl_agrees_with_the_command() {
    let w = World::start_with(Setup {
        extra_server: "selftest = true".into(),
        ..Setup::default()
    })
    .await;
    let seen_before = w.provider.seen().len();
    for (stem, from, trace) in [
        ("consumer", FROM, trace_id(1)),
        ("consumer2", FROM_2, trace_id(2)),
    ] {
        let req = build(request(&w, Method::GET, "/metadata", METADATA), |h| {
            h.insert("ssp-from", from.parse().unwrap());
            h.insert("ssp-traceid", trace.parse().unwrap());
        });
        let (_, offline) = onboard(
            &w,
            w.pki.path(&format!("{stem}.crt")).to_str().unwrap(),
            &req,
            &[],
        );
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(w.pki.path("ca.crt"))
            .arg("--cert")
            .arg(w.pki.path(&format!("{stem}.crt")))
            .arg("--key")
            .arg(w.pki.path(&format!("{stem}.key")))
            .args([
                "--resolve",
                &format!("ssp.dev.localhost:{}:127.0.0.1", w.proxy.addr.port()),
            ]);
        for (name, value) in req.headers() {
            if name != "host" {
                curl.arg("-H")
                    .arg(format!("{name}: {}", value.to_str().unwrap()));
            }
        }
        curl.arg(format!(
            "https://127.0.0.1:{}/_ssp/selftest/{}",
            w.proxy.addr.port(),
            &req.uri().to_string()[1..]
        ));
        // Off the test's runtime, which serves the proxy's listener.
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(live["verdict"], offline["verdict"], "{live}\n{offline}");
        assert_eq!(live["refusal"], offline["refusal"], "{live}\n{offline}");
        for n in 1..10 {
            assert_eq!(
                live["checks"][n]["result"],
                offline["checks"][n]["result"],
                "check {}: {live}",
                n + 1
            );
            assert_eq!(
                live["checks"][n]["refusal"],
                offline["checks"][n]["refusal"],
                "check {}",
                n + 1
            );
        }
        assert_eq!(live["checks"][10]["result"], "pass", "{live}");
        assert_eq!(live["checks"][11]["result"], "pass", "{live}");
        // The record is written after the answer (batched): wait for it.
        let deadline = std::time::Instant::now() + STEP;
        let record = loop {
            let found = w
                .records(0)
                .await
                .into_iter()
                .find(|r| r["kind"] == "selftest" && r["trace_id"] == trace.as_str());
            if let Some(record) = found {
                break record;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no selftest record for {trace}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(record["verdict"], live["verdict"]);
        assert_eq!(record["failed"], live["failed"]);
    }
    assert_eq!(
        w.provider.seen().len(),
        seen_before,
        "the self-test forwarded something"
    );
    // Off by default: the path is not a target.
    let off = World::start().await;
    let answer = within(
        "selftest off",
        off.consumer("consumer").fetch(build(
            ssp_request(Method::GET, "/_ssp/selftest", METADATA),
            |_| {},
        )),
    )
    .await
    .unwrap();
    answer.assert_outcome(400, "invalid", "INVALID_TARGET_URL");
}

/// The radar: one handshake with a certificate expiring in 5 days, and the gauge, `ssp certs report` and the
/// operator guide's alert rule (through `promtool test rules`) all show it; a registered ASID's requests with
/// another system's certificate are warned of once.
#[tokio::test]
async fn a_certificate_expiring_in_five_days_shows_in_the_gauge_the_report_and_the_alert() {
    let w = World::start().await;
    let not_after = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        + time::Duration::days(5);
    issue(&w.pki, "consumer-5d", |p| p.not_after = not_after);
    let answer = within(
        "a request",
        w.consumer("consumer-5d").fetch(build(
            request(&w, Method::GET, "/metadata", METADATA),
            |_| {},
        )),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    let series = format!("ssp_consumer_cert_expiry_timestamp_seconds{{asid=\"{FROM}\"}}");
    let deadline = std::time::Instant::now() + STEP;
    while metric_value(w.admin, &series).await != not_after.unix_timestamp() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            metrics_text(w.admin).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Only registered consumers have a series.
    let text = metrics_text(w.admin).await;
    let series_count = text
        .lines()
        .filter(|l| l.starts_with("ssp_consumer_cert_expiry_timestamp_seconds{"))
        .count();
    assert_eq!(series_count, 1, "{text}");

    // The report, as the operator sends it; a 10-year certificate is not within 7 days.
    within(
        "a 10-year certificate",
        w.consumer("consumer").fetch(build(
            request(&w, Method::GET, "/metadata", METADATA),
            |_| {},
        )),
    )
    .await
    .unwrap();
    let config = w.pki.dir.path().join("ssp.toml");
    let args = [
        "certs",
        "report",
        "--within",
        "7d",
        "--format",
        "json",
        "--config",
        config.to_str().unwrap(),
    ];
    let deadline = std::time::Instant::now() + STEP;
    let rows = loop {
        let (code, out) = ssp_cmd(&args);
        assert_eq!(code, 0, "{out}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        if !rows.as_array().unwrap().is_empty() {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the report never listed the certificate"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["asid"], FROM);
    assert_eq!(rows[0]["certificate"]["fqdn"], CONSUMER_NAME);
    assert_eq!(
        rows[0]["certificate"]["not_after"],
        not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    let (_, table) = ssp_cmd(&["certs", "report", "--config", config.to_str().unwrap()]);
    // Soonest expiry first.
    let expiry = not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(FROM) && l.contains(&expiry)),
        "{table}"
    );

    // The alert rules of docs/operator-guide.md, fed the gauge's remaining seconds.
    let gauge = metric_value(w.admin, &series).await as i64;
    let left = gauge - time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(promtool) = which("promtool") {
        let guide = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/operator-guide.md"
        ))
        .unwrap();
        let start = guide.find("```yaml\ngroups:").unwrap() + "```yaml\n".len();
        let rules = &guide[start..start + guide[start..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        let test = format!(
            r#"rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ssp_consumer_cert_expiry_timestamp_seconds{{asid="{FROM}"}}'
        values: '{left}x5'
      - series: 'ssp_consumer_cert_expiry_timestamp_seconds{{asid="{FROM_2}"}}'
        values: '{far}x5'
    alert_rule_test:
      - eval_time: 1m
        alertname: SspConsumerCertificateExpiresIn7Days
        exp_alerts:
          - exp_labels: {{severity: critical, asid: "{FROM}"}}
      - eval_time: 1m
        alertname: SspConsumerCertificateExpiresIn30Days
        exp_alerts:
          - exp_labels: {{severity: warning, asid: "{FROM}"}}
"#,
            far = 40 * 86_400
        );
        std::fs::write(dir.path().join("test.yml"), test).unwrap();
        let out = std::process::Command::new(promtool)
            .args(["test", "rules", "test.yml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Another system's certificate on a registered ASID's requests: refused at check 5, warned of once.
    let mismatch = "ssp_consumer_cert_warnings_total{kind=\"fqdn_mismatch\"}";
    assert_eq!(metric_value(w.admin, mismatch).await, 0);
    for _ in 0..2 {
        let answer = within(
            "a mismatch",
            w.consumer("consumer2").fetch(build(
                request(&w, Method::GET, "/metadata", METADATA),
                |_| {},
            )),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 403);
    }
    assert_eq!(metric_value(w.admin, mismatch).await, 1);
}

/// A program on `PATH`, or `None` outside CI when it is not installed (`.ci/run` installs it).
fn which(program: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is not installed"
        );
        eprintln!("SKIPPED: {program} is not installed");
    }
    found
}
