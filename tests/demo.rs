//! `ssp demo`, the newcomer's first run: every scenario gets the answer it expects, the curl lines are printed,
//! and Ctrl-C (SIGINT) ends it cleanly. Its dev provider reads a request's whole body before it answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

/// The demo runs its scenarios against the repository's dev policy and the dev provider, all as expected.
#[tokio::test]
async fn demo_runs_every_scenario_as_expected() {
    let pki = Pki::generate();
    let dir = pki.dir.path();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies/dev.toml"),
        dir.join("policies/dev.toml"),
    )
    .unwrap();
    let provider_port = closed_port().await;
    let down = closed_port().await;
    let auth = closed_port().await;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
cert = "certs/proxy-server.crt"
key = "certs/proxy-server.key"
client_ca = ["certs/ca.crt"]
crl = ["certs/ca.crl"]
[upstream]
cert = "certs/proxy-client.crt"
key = "certs/proxy-client.key"
ca = ["certs/ca.crt"]
[admin]
listen = "127.0.0.1:0"
[upstream.resolve]
"provider.dev.localhost:9443" = "{provider_port}"
"provider2.dev.localhost:9444" = "{down}"
"provider.dev.localhost:9445" = "{auth}"
[patient_facing]
listen = "127.0.0.1:0"
asid = "200000000999"
issuer = "https://auth.dev.localhost"
audience = "ssp-patient-facing"
jwks = "https://provider.dev.localhost:9445/jwks"
scope = "gp-connect:patient"
ods_claim = "gp_registration_details.gp_ods_code"
assertion_key = "certs/pf-assertion.key"
[[patient_facing.route]]
path = "/fhir/Patient"
interaction = "urn:nhs:names:services:gpconnect:fhir:rest:search:patient-1"
"#
    );
    std::fs::write(dir.join("ssp.toml"), config).unwrap();

    let mut child = Command::new(ssp_bin())
        .args(["demo", "--config"])
        .arg(dir.join("ssp.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut output = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
                if line.contains("serving until Ctrl-C") {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("demo did not finish its scenarios:\n{output}");
            }
        }
    }
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "demo exit after SIGINT\n{output}");

    assert!(
        !output.contains("did not get the expected answer"),
        "{output}"
    );
    for expected in [
        "200 CapabilityStatement",
        "200 Bundle",
        "200 Practitioner",
        "refused: ",
        // Check 1's refusals name the TLS alert the proxy sent, not a connection that merely went away.
        "received fatal alert: CertificateRevoked",
        "received fatal alert: CertificateExpired",
        "405 405: Method Not Allowed",
        "400 INVALID_TARGET_URL",
        "400 MISSING_OR_INVALID_HEADER_Ssp-TraceID",
        "403 FQDN_CHECK_FAILED_MESSAGESENDER_200000000359",
        "403 ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
        "403 PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999",
        "403 FOT_CHECK_FAILED_MESSAGESENDER_200000000360_MESSAGERECEIVER_918999198993",
        "400 ENDPOINT_https://provider.dev.localhost:9443/B82617/STU3/1/gpconnect_CPAID_S20001A000123",
        "400 INVALID_JWT_AUD_MISMATCH",
        "502 ERROR_COMMUNICATING_TO_ENDPOINT_URL_https://provider2.dev.localhost:9444",
        // The patient-facing door beside the clinical one: a patient and a proxy user, then two refusals.
        "pf           patient, NHS login P9              200                200 Bundle",
        "pf           proxy user acting for the patient  200                200 Bundle",
        "401 ACCESS_TOKEN_MISSING",
        "403 PROOFING_LEVEL_TOO_LOW",
        "curl --cert",
        "# patient-facing (token valid 5 minutes):",
    ] {
        assert!(
            output.contains(expected),
            "missing {expected:?} in\n{output}"
        );
    }
}

/// The dev provider reads a request's whole body before it answers. One that answered first and closed with the body
/// unread would have its kernel reset the connection (RFC 9112 section 9.6): the upload breaks off, and the reset
/// can destroy the answer before the client reads it (through the proxy, that was a 502 for about half of the 1 MiB
/// uploads curl sent over HTTP/2). Here curl uploads 32 MiB, more than loopback's socket buffers hold, straight to
/// the provider with the proxy's client certificate, and must get 200 with every byte sent.
#[tokio::test]
async fn the_dev_provider_reads_the_whole_body_before_it_answers() {
    const BODY: usize = 32 << 20;
    let pki = Pki::generate();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = ssp::demo::provider_tls(
        &pki.path("provider.crt"),
        &pki.path("provider.key"),
        &pki.ca(),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let provider = tokio::spawn(ssp::demo::serve_provider(
        listener,
        tls,
        ssp::demo::devcerts::PROXY_CLIENT_NAME.to_owned(),
        async {
            let _ = stopped.await;
        },
    ));
    let body = pki.dir.path().join("body.bin");
    std::fs::write(&body, vec![b'{'; BODY]).unwrap();
    // curl asks for `100 Continue` before a large body; `Expect:` (empty) makes it send the body at once.
    for expect in ["", "Expect:"] {
        let mut curl = Command::new("curl");
        curl.args(["--http1.1", "-s", "--max-time", "15", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{size_upload}"])
            .args(["-H", expect])
            .arg("--cert")
            .arg(pki.path("proxy-client.crt"))
            .arg("--key")
            .arg(pki.path("proxy-client.key"))
            .arg("--cacert")
            .arg(pki.path("ca.crt"))
            .arg("--resolve")
            .arg(format!("provider.dev.localhost:{port}:127.0.0.1"))
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!(
                "https://provider.dev.localhost:{port}/B82617/STU3/1/gpconnect/fhir/Patient/$gpc.getstructuredrecord"
            ));
        let out = within(
            "curl's upload",
            tokio::task::spawn_blocking(move || curl.output().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("200 {BODY}"),
            "header {expect:?}: curl exit {:?}, stderr {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = stop.send(());
    within("the provider's stop", provider).await.unwrap();
}
