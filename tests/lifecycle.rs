//! The process lifecycle of `ssp serve`: systemd notifications in order, and a graceful stop that lets an
//! in-flight download finish, refuses new connections, exits 0 and leaves a sealed, verifiable audit log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::*;

/// Reads the next notification datagram, as systemd would.
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("no notification from ssp within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// With a socket standing in for systemd, `ssp serve` sends READY=1 once serving, RELOADING=1 (with
/// MONOTONIC_USEC) and READY=1 around a SIGHUP reload, and STOPPING=1 on SIGTERM, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_in_order() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let path = pki.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut served = serve_with_env(
        &pki,
        provider.addr,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;

    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // It is really serving when it says so.
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let req = ssp_request(
        Method::GET,
        &format!("/{}/fhir/metadata", endpoint_url(provider.addr)),
        METADATA,
    )
    .body(empty())
    .unwrap();
    assert_eq!(
        within("ready", consumer.fetch(req)).await.unwrap().status,
        StatusCode::OK
    );

    signal(served.child.id(), "HUP");
    let reloading = next_notification(&socket);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    let ready_again = next_notification(&socket);
    assert!(ready_again.lines().any(|l| l == "READY=1"), "{ready_again}");

    signal(served.child.id(), "TERM");
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = served.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// SIGTERM during a slow download: the download completes, new connections are refused, the process exits 0 and
/// the audit log verifies, sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_exchanges() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let mut served = serve(&pki, provider.addr).await;
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let req = ssp_request(
        Method::GET,
        &format!("/{}/fhir/slow", endpoint_url(provider.addr)),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let response = within("slow", consumer.send(req)).await.unwrap();
    let mut body = response.into_body();
    let first = within("first chunk", body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(first, "first,");

    signal(served.child.id(), "TERM");
    // The listener closes: new connections are refused while the download is still open.
    let deadline = Instant::now() + STEP;
    while tokio::net::TcpStream::connect(served.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "exited with a download in flight"
    );

    provider.state.release_slow.notify_one();
    let rest = within("rest", body.collect()).await.unwrap().to_bytes();
    assert_eq!(rest, "last");
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit after the last exchange ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    let v = ssp::audit::verify(&pki.dir.path().join("data/audit")).unwrap();
    assert!(v.last_sealed, "a clean stop seals the log");
    let records = ssp::audit::query(
        &pki.dir.path().join("data/audit"),
        &ssp::audit::Filter::default(),
    )
    .unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "response" && r["outcome"] == "ok"),
        "{records:#?}"
    );
}

/// SIGTERM during a download that outlasts `shutdown_grace`: once the grace is over the exchange is ended, and its
/// response record (`client_closed`) is written before the log is sealed: the transaction is whole in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_cut_at_the_end_of_the_grace_keeps_its_records() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let mut served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            extra_server: "shutdown_grace = \"1s\"".into(),
            ..Setup::default()
        },
        &[],
        ChildLog::Null,
    )
    .await;
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let req = ssp_request(
        Method::GET,
        &format!("/{}/fhir/slow", endpoint_url(provider.addr)),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let trace_id = req.headers()["ssp-traceid"].to_str().unwrap().to_owned();
    let response = within("slow", consumer.send(req)).await.unwrap();
    let mut body = response.into_body();
    within("first chunk", body.frame()).await.unwrap().unwrap();

    // The provider never finishes: the process must end once the grace is over.
    signal(served.child.id(), "TERM");
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after its grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    let dir = pki.dir.path().join("data/audit");
    let v = ssp::audit::verify(&dir).unwrap();
    assert!(v.last_sealed, "a clean stop seals the log");
    let records = ssp::audit::query(
        &dir,
        &ssp::audit::Filter {
            trace_id: Some(trace_id),
            ..ssp::audit::Filter::default()
        },
    )
    .unwrap();
    let kinds: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or("-"),
                r["outcome"]
                    .as_str()
                    .or(r["decision"].as_str())
                    .unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("request", "permit"), ("response", "client_closed")],
        "{records:#?}"
    );
}

/// With `[log] format = "json"` every operational log line is a JSON object; refusals and exchanges carry the
/// trace id and a bounded reason, and no line contains the token, a claim or the patient identifier in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_operational_log_never_holds_tokens_or_patient_ids() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let listen = closed_port().await;
    let config = write_config(
        &pki,
        provider.addr,
        closed_port().await,
        listen,
        &Setup::default(),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[log]\nformat = \"json\"\nlevel = \"debug\"\n");
    std::fs::write(&config, text).unwrap();
    let child = std::process::Command::new(ssp_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "ssp serve did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let consumer = Consumer::new(&pki, Some("consumer"), listen, false);
    let url = endpoint_url(provider.addr);
    let patient = "9690937286";
    let permitted = ssp_request(
        Method::GET,
        &format!("/{url}/fhir/Patient?identifier=nhs-number%7C{patient}"),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let token = permitted.headers()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        within("permitted", consumer.fetch(permitted))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let refused = ssp_request(
        Method::GET,
        &format!("/{url}/fhir/Appointment?patient={patient}"),
        APPOINTMENT,
    )
    .body(empty())
    .unwrap();
    assert_eq!(
        within("refused", consumer.fetch(refused))
            .await
            .unwrap()
            .status,
        StatusCode::FORBIDDEN
    );
    // Every exchange ends, and logs its line, before the process exits: the log is read after the exit.
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refusal = lines
        .iter()
        .find(|l| l["fields"]["reason"] == "asid_check_failed")
        .unwrap_or_else(|| panic!("no refusal line in\n{log}"));
    assert_eq!(refusal["fields"]["trace_id"], TRACE_ID);
    assert_eq!(refusal["fields"]["from"], FROM);
    assert_eq!(refusal["fields"]["to"], TO);
    let exchange = lines
        .iter()
        .find(|l| l["fields"]["message"] == "exchange")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(exchange["fields"]["outcome"], "ok");
    let jwt = token.trim_start_matches("Bearer ");
    for forbidden in [
        patient,
        jwt,
        jwt.split('.').nth(1).unwrap(),
        "requesting_practitioner",
        "111222333444",
    ] {
        assert!(
            !log.contains(forbidden),
            "the operational log holds {forbidden:?}:\n{log}"
        );
    }
}
