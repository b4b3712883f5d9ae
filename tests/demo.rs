//! `ssp demo`, the newcomer's first run: every scenario gets the answer it expects, the curl lines are printed,
//! and Ctrl-C (SIGINT) ends it cleanly.

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
        "curl --cert",
    ] {
        assert!(
            output.contains(expected),
            "missing {expected:?} in\n{output}"
        );
    }
}
