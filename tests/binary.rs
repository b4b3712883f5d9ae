//! The `ssp` binary as operators and real clients use it: `serve` as a child process driven by curl and openssl,
//! its memory while 200 MiB streams each way, and the exit codes of `check-config`, `dev-certs` and bad usage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use support::*;

/// 200 MiB up and 200 MiB down stream through the real binary while its peak resident memory stays under
/// 64 MiB: bodies are never collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_200_mib_each_way_in_bounded_memory() {
    const LEN: u64 = 200 * 1024 * 1024;
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
    let url = endpoint_url(provider.addr);
    let baseline = vm_hwm_kib(served.child.id());

    let upload = ssp_request(Method::POST, &format!("/{url}/fhir/upload"), STRUCTURED)
        .body(RepeatBody::new(LEN, true).boxed())
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(300), consumer.fetch(upload))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(provider.state.uploaded.load(Ordering::SeqCst), LEN);

    let download = ssp_request(
        Method::GET,
        &format!("/{url}/fhir/big?bytes={LEN}"),
        METADATA,
    )
    .body(empty())
    .unwrap();
    let response = within("download headers", consumer.send(download))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let got = tokio::time::timeout(Duration::from_secs(300), drain(response.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, LEN);

    let peak = vm_hwm_kib(served.child.id());
    eprintln!("ssp serve VmHWM: {baseline} KiB at start, {peak} KiB after 2 x 200 MiB");
    assert!(
        peak < 64 * 1024,
        "proxy peak RSS {peak} KiB is not under 64 MiB"
    );
}

/// curl, a real client, gets the provider's answer through the running binary, byte for byte, over HTTP/1.1
/// and with `--http1.0` (which offers ALPN `http/1.0` alone).
#[tokio::test]
async fn curl_through_the_binary() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = endpoint_url(provider.addr);
    for version in ["--http1.1", "--http1.0"] {
        let out = tokio::task::spawn_blocking({
        let (cert, key, ca) = (pki.path("consumer.crt"), pki.path("consumer.key"), pki.path("ca.crt"));
        let token = bearer(&claims(&url, METADATA));
        let target = format!("https://{}/{url}/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286", served.addr);
        move || {
            Command::new("curl")
                .args(["-sS", version, "--max-time", "20", "-w", "\n%{http_code}"])
                .arg("--cert").arg(cert)
                .arg("--key").arg(key)
                .arg("--cacert").arg(ca)
                .args(["-H", &format!("Ssp-TraceID: {TRACE_ID}")])
                .args(["-H", &format!("Ssp-From: {FROM}")])
                .args(["-H", &format!("Ssp-To: {TO}")])
                .args(["-H", &format!("Ssp-InteractionId: {METADATA}")])
                .args(["-H", &format!("Authorization: {token}")])
                .arg(target)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected_path =
            "/gp/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9690937286";
        assert_eq!(
            stdout,
            format!("provider saw {expected_path}\n200"),
            "{version}"
        );
        let seen = provider.seen();
        assert_eq!(seen.last().unwrap().path_and_query, expected_path);
        assert_eq!(seen.last().unwrap().headers["ssp-interactionid"], METADATA);
    }

    // SIGTERM stops it cleanly.
    let mut served = served;
    signal(served.child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ssp serve ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
}

fn s_client(addr: SocketAddr, args: &[&str], pki: &Pki) -> (bool, String) {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .args(["-connect", &addr.to_string()])
        .args(args)
        .arg("-CAfile")
        .arg(pki.path("ca.crt"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("openssl s_client hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `openssl s_client` shows a TLS 1.1 attempt refused, while TLS 1.2 with a client certificate is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_tls_1_1_is_refused() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let addr = served.addr;
    // The proxy is another process, so blocking this test's thread on openssl is harmless.
    let (ok, text) = s_client(addr, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"], &pki);
    assert!(!ok, "TLS 1.1 handshake succeeded:\n{text}");
    // openssl names the attempted protocol even on failure; no cipher and the server's alert show the refusal.
    assert!(
        text.contains("alert") && text.contains("Cipher is (NONE)"),
        "{text}"
    );

    let cert = pki.path("consumer.crt").display().to_string();
    let key = pki.path("consumer.key").display().to_string();
    let (ok, text) = s_client(addr, &["-tls1_2", "-cert", &cert, "-key", &key], &pki);
    assert!(ok, "TLS 1.2 handshake failed:\n{text}");
    assert!(
        text.contains("TLSv1.2") && !text.contains("Cipher is (NONE)"),
        "{text}"
    );
}

fn ssp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ssp_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check-config` exits 0 on a good config and 64 with one line per problem, naming the key or path, otherwise.
#[tokio::test]
async fn check_config_exit_codes() {
    let pki = Pki::generate();
    let config_arg = offline_config(&pki).await;
    let config = std::path::PathBuf::from(&config_arg);
    let (code, out, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok"), "{out}");

    let (code, _, err) = ssp(&["check-config", "--config", "/nonexistent/ssp.toml"]);
    assert_eq!(code, 64);
    assert!(
        err.starts_with("/nonexistent/ssp.toml: cannot read"),
        "{err}"
    );

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "handshake_timeout = \"5s\"",
            "handshake_timeout = \"5s\"\nlisten_port = 1",
        ),
    )
    .unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("listen_port"), "{err}");

    std::fs::write(
        &config,
        text.replace("certs/proxy-client.key", "certs/missing.key")
            .replace("certs/ca.crl", "certs/ca.crt"),
    )
    .unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64);
    assert!(
        err.lines()
            .any(|l| l.contains(": upstream.key: ") && l.contains("missing.key")),
        "{err}"
    );
    assert!(err.lines().any(|l| l.contains(": server.crl: ")), "{err}");

    std::fs::write(&config, &text).unwrap();
    std::fs::write(
        pki.dir.path().join("policies/test.toml"),
        "[[system]]\nasid = \"x\"\n",
    )
    .unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64);
    assert!(err.contains("test.toml"), "{err}");
}

/// `dev-certs` writes a PKI that the proxy accepts; bad usage exits 64.
#[tokio::test]
async fn dev_certs_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let (code, stdout, _) = ssp(&["dev-certs", "--out", &out.display().to_string()]);
    assert_eq!(code, 0);
    assert!(stdout.contains("NOT FOR PRODUCTION"));
    for name in [
        "ca.crt",
        "ca.crl",
        "proxy-server.key",
        "consumer2.crt",
        "consumer-revoked.crt",
        "consumer-expired.crt",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // Every certificate passes OpenSSL's strict X.509 checks (Authority Key Identifier and the rest), those just
    // written and those shipped in certs-dev/, which the demo and the README's curl lines use.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev");
    for dir in [out.as_path(), shipped.as_path()] {
        for name in [
            "ca.crt",
            "proxy-server.crt",
            "proxy-client.crt",
            "consumer.crt",
            "consumer2.crt",
            "provider.crt",
            "consumer-revoked.crt",
            "consumer-expired.crt",
        ] {
            let verified = std::process::Command::new("openssl")
                .args(["verify", "-x509_strict", "-no_check_time", "-CAfile"])
                .arg(dir.join("ca.crt"))
                .arg(dir.join(name))
                .output()
                .unwrap();
            assert!(
                verified.status.success(),
                "{}: {}{}",
                dir.join(name).display(),
                String::from_utf8_lossy(&verified.stdout),
                String::from_utf8_lossy(&verified.stderr)
            );
        }
    }

    let (code, _, _) = ssp(&["serve", "--no-such-flag"]);
    assert_eq!(code, 64);
    let (code, _, _) = ssp(&["frobnicate"]);
    assert_eq!(code, 64);
}

/// Crash safety: `ssp serve` under load is killed with SIGKILL. Every request whose response a client received has
/// its `request` record, the chain verifies, and after a restart the writer seals the crashed segment and
/// continues the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_record() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let mut served = serve(&pki, provider.addr).await;
    let url = endpoint_url(provider.addr);
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
        let (answered, url) = (answered.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let Ok(mut sender) = consumer.connect().await else {
                return;
            };
            // Bounded: the proxy is killed long before this many requests.
            for _ in 0..20_000 {
                let trace_id = ssp::ids::TraceId::new_random().as_str().to_owned();
                let mut req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
                    .body(empty())
                    .unwrap();
                req.headers_mut()
                    .insert("ssp-traceid", trace_id.parse().unwrap());
                let Ok(response) = sender.send(req).await else {
                    return;
                };
                if response.status() == StatusCode::OK && drain(response.into_body()).await.is_ok()
                {
                    answered.lock().unwrap().push(trace_id);
                } else {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(served.child.id(), "KILL");
    let _ = served.child.wait();
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    }
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() > 50,
        "too little load to mean anything: {}",
        answered.len()
    );

    let dir = pki.dir.path().join("data/audit");
    let records = ssp::audit::query(&dir, &ssp::audit::Filter::default()).unwrap();
    let requested: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r["kind"] == "request")
        .filter_map(|r| r["trace_id"].as_str())
        .collect();
    let missing: Vec<&String> = answered
        .iter()
        .filter(|t| !requested.contains(t.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no request record",
        missing.len()
    );
    match ssp::audit::verify(&dir) {
        Ok(v) => assert!(
            !v.last_sealed,
            "a killed writer cannot have sealed its segment"
        ),
        // A kill in the middle of a write leaves a torn line: detected, and set aside on restart.
        Err(broken) => assert!(broken.problem.contains("torn"), "{broken}"),
    }
    let before = records.len();

    // Restart on the same log: the crashed segment is sealed as recovered and the chain goes on.
    let restarted = serve(&pki, provider.addr).await;
    let consumer = Consumer::new(&pki, Some("consumer"), restarted.addr, false);
    let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
        .body(empty())
        .unwrap();
    assert_eq!(
        within("after restart", consumer.fetch(req))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    audit_records(&dir, before + 2).await;
    drop(restarted);
    let v = ssp::audit::verify(&dir).unwrap();
    assert_eq!(v.segments, 2);
    let first = std::fs::read_to_string(dir.join("audit-00000001.jsonl")).unwrap();
    let seal: serde_json::Value = serde_json::from_str(first.lines().last().unwrap()).unwrap();
    assert_eq!(seal["kind"], "seal");
    assert_eq!(seal["sealed"], "recovered");
    eprintln!("{} answered before the kill; {v:?}", answered.len());
}

/// `server.workers = 3`: the binary runs three worker threads, and three connections open at once are served one
/// per worker (the accept loop hands each to the worker with the fewest connections). A worker that serves
/// nothing stays parked in its event loop, so each one's context switches show it served one.
#[tokio::test]
async fn connections_are_spread_over_the_configured_workers() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve_setup(
        &pki,
        provider.addr,
        &Setup {
            extra_server: "workers = 3".into(),
            ..Setup::default()
        },
        &[],
        ChildLog::Inherit,
    )
    .await;
    let pid = served.child.id();
    // The start-up probe (a TCP connect and close) went to worker 0 and may not be closed yet: then the three
    // connections below go to workers 1, 2 and 0, else to 0, 1 and 2. Each worker serves one either way.
    let workers = |pid: u32| -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let comm = comm.trim().to_owned();
            if comm.starts_with("ssp-worker-") {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                let switches = status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                out.push((comm, switches));
            }
        }
        out.sort();
        out
    };
    let before = workers(pid);
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["ssp-worker-0", "ssp-worker-1", "ssp-worker-2"]);
    let url = endpoint_url(provider.addr);
    let mut senders = Vec::new();
    for _ in 0..3 {
        let consumer = Consumer::new(&pki, Some("consumer"), served.addr, false);
        senders.push(within("connect", consumer.connect()).await.unwrap());
    }
    // All three are open before any request, so each went to a different worker.
    for sender in &mut senders {
        let req = ssp_request(Method::GET, &format!("/{url}/fhir/metadata"), METADATA)
            .body(empty())
            .unwrap();
        let response = within("request", sender.send(req)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain(response.into_body()).await.unwrap();
    }
    let after = workers(pid);
    for ((name, was), (_, now)) in before.iter().zip(&after) {
        assert!(
            now > was,
            "{name} served nothing: {before:?} then {after:?}"
        );
    }
}

/// `check-config` reports every problem of one config in one run (a wrong type, a bad listen address, a bad
/// duration, a missing certificate and an unknown policy key together), each config value with its line; a key
/// that is not its certificate's names both files; an expired and a not-yet-valid certificate name their dates.
#[tokio::test]
async fn check_config_reports_every_problem_in_one_run() {
    let pki = Pki::generate();
    let config_arg = offline_config(&pki).await;
    let config = std::path::PathBuf::from(&config_arg);
    let text = std::fs::read_to_string(&config).unwrap();
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    let broken = text
        .replace("max_connections = 10000", "max_connections = \"many\"")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"")
        .replace(
            "handshake_timeout = \"5s\"",
            "handshake_timeout = \"5 seconds\"",
        )
        .replace("certs/proxy-client.crt", "certs/missing.crt");
    std::fs::write(&config, &broken).unwrap();
    let policy = pki.dir.path().join("policies/test.toml");
    let policy_text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        policy_text.replacen(
            "name = \"Hospital\"",
            "name = \"Hospital\"\ncolour = \"red\"",
            1,
        ),
    )
    .unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64, "{err}");
    let wanted = [
        format!(
            "line {}, column 19: server.max_connections: invalid type",
            line_of(&broken, "max_connections")
        ),
        format!("line {}: server.listen", line_of(&broken, "listen =")),
        format!(
            "line {}: server.handshake_timeout",
            line_of(&broken, "handshake_timeout")
        ),
        format!(
            "line {}: upstream.cert: ",
            line_of(&broken, "cert = \"certs/missing.crt\"")
        ),
        "missing.crt".to_owned(),
        "colour".to_owned(),
    ];
    for want in &wanted {
        assert!(err.contains(want.as_str()), "{want:?} missing from:\n{err}");
    }

    // A key that is not the certificate's; an expired certificate; a CA file not valid yet.
    let future = {
        let mut params =
            rcgen::CertificateParams::new(vec!["future.dev.localhost".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(400);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap()
    };
    std::fs::write(pki.path("future-ca.crt"), future.pem()).unwrap();
    let mixed = text
        .replace(
            "key = \"certs/proxy-server.key\"",
            "key = \"certs/proxy-client.key\"",
        )
        .replace(
            "cert = \"certs/proxy-client.crt\"",
            "cert = \"certs/consumer-expired.crt\"",
        )
        .replace(
            "key = \"certs/proxy-client.key\"\nca",
            "key = \"certs/consumer-expired.key\"\nca",
        )
        .replacen(
            "ca = [\"certs/ca.crt\"]\nconnect",
            "ca = [\"certs/future-ca.crt\"]\nconnect",
            1,
        );
    std::fs::write(&config, &mixed).unwrap();
    std::fs::write(&policy, &policy_text).unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64, "{mixed}\n{err}");
    assert!(
        err.lines().any(|l| l.contains(": server.key ")
            && l.contains("proxy-client.key is not the private key of server.cert")
            && l.contains("proxy-server.crt")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("consumer-expired.crt: certificate expired (notAfter 20")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("future-ca.crt: certificate not yet valid (notBefore 20")),
        "{err}"
    );

    // A required key of the wrong type does not hide the files other keys name; what needs it is named skipped.
    let refused = text
        .replace(
            "client_ca = [\"certs/ca.crt\"]",
            "client_ca = \"certs/ca.crt\"",
        )
        .replace("certs/proxy-client.key", "certs/missing.key");
    std::fs::write(&config, &refused).unwrap();
    let (code, _, err) = ssp(&["check-config", "--config", &config_arg]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("server.client_ca: invalid type"), "{err}");
    assert!(
        err.contains(&format!(
            "line {}: upstream.key: {}",
            line_of(&refused, "key = \"certs/missing.key\""),
            pki.path("missing.key").display()
        )),
        "{err}"
    );
    assert!(
        err.lines().last().is_some_and(|l| l.ends_with(
            "skipped: the checks that need server.client_ca (missing or refused above); everything else was checked"
        )),
        "{err}"
    );
}

/// Makes everything under `root` readable (and its folders searchable) by an unprivileged user.
fn make_readable(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut walk = vec![root.to_path_buf()];
    while let Some(path) = walk.pop() {
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if path.is_dir() {
            walk.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

fn running_as_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    String::from_utf8_lossy(&uid).trim() == "0"
}

/// Runs `ssp check-config --config CONFIG` as the service's user would: as `nobody` through `setpriv` when the
/// test runs as root (as CI does, and as systemd's `User=` would), else as the test's own user. Returns the exit
/// code and stderr.
fn check_config_as_service_user(config: &str) -> (Option<i32>, String) {
    let mut command = if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(ssp_bin());
        c
    } else {
        Command::new(ssp_bin())
    };
    let out = command
        .args(["check-config", "--config", config])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check-config`, run as the service's user, finds the state folders it cannot create or write: `audit.dir` in a
/// folder it may not write, `policy.store` under one it may not create in, and a segment left in a writable
/// `audit.dir` by a run as another user that it cannot append to; each line names the key, the path and the OS
/// error.
#[tokio::test]
async fn check_config_finds_state_folders_the_service_user_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::generate();
    let config_arg = offline_config(&pki).await;
    let root = pki.dir.path();
    let locked = root.join("locked");
    std::fs::create_dir_all(locked.join("audit")).unwrap();
    let text = std::fs::read_to_string(&config_arg).unwrap();
    let with_state = |audit: &str, store: &str| {
        text.replace("dir = \"data/audit\"", &format!("dir = \"{audit}\""))
            .replace(
                "dir = \"policies\"",
                &format!("dir = \"policies\"\nstore = \"{store}\""),
            )
    };
    std::fs::write(&config_arg, with_state("locked/audit", "locked/policy")).unwrap();
    make_readable(root);
    // As root the folders stay root's (0755), which `nobody` cannot write; otherwise the write bit goes.
    if !running_as_root() {
        for dir in [&locked, &locked.join("audit")] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
    }
    let (code, err) = check_config_as_service_user(&config_arg);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.lines().any(|l| l.contains(&format!(
            ": audit.dir: {}: cannot write in it: ",
            locked.join("audit").display()
        )) && l.contains("os error 13")),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.contains(&format!(
            ": policy.store: {}: cannot be created in {}: ",
            locked.join("policy").display(),
            locked.display()
        )) && l.contains("os error 13")),
        "{err}"
    );
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A writable audit folder holding a segment the service user cannot append to (left by a run as root).
    let owned = root.join("owned");
    std::fs::create_dir_all(owned.join("audit")).unwrap();
    std::fs::create_dir_all(owned.join("policy")).unwrap();
    std::fs::write(&config_arg, with_state("owned/audit", "owned/policy")).unwrap();
    let segment = owned.join("audit/audit-00000001.jsonl");
    std::fs::write(&segment, "").unwrap();
    make_readable(root);
    if running_as_root() {
        for dir in ["audit", "policy"] {
            std::os::unix::fs::chown(owned.join(dir), Some(65534), Some(65534)).unwrap();
        }
    }
    std::fs::set_permissions(&segment, std::fs::Permissions::from_mode(0o400)).unwrap();
    let (code, err) = check_config_as_service_user(&config_arg);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.lines().any(|l| l.contains(&format!(
            ": audit.dir: {}: {} cannot be opened for writing: ",
            owned.join("audit").display(),
            segment.display()
        )) && l.contains("os error 13")),
        "{err}"
    );
    assert!(!err.contains("policy.store"), "{err}");
}

/// An audit log that cannot be opened at start stops `ssp serve` before it tells systemd READY=1: it exits 64
/// (a state-folder problem, as a bad config) naming `audit.dir`, and the notification socket holds no READY=1.
#[tokio::test]
async fn serve_does_not_start_without_its_audit_log() {
    let pki = Pki::generate();
    let setup = Setup {
        // Under a regular file: the folder can never be made.
        audit_dir: "ssp.toml/audit",
        ..Setup::default()
    };
    let config = write_config(
        &pki,
        closed_port().await,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        &setup,
    );
    let socket_path = pki.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let out = Command::new(ssp_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("audit.dir"), "{err}");
    // The process has ended: whatever it sent is queued on the socket by now.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut sent = String::new();
    while let Ok(n) = socket.recv(&mut buf) {
        sent.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(!sent.contains("READY=1"), "{sent}");
}

/// Every file the unit's `Documentation=` names is put there by the install steps of the operator guide.
#[test]
fn the_units_documentation_is_installed_by_the_install_steps() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/ssp.service")).unwrap();
    let guide = std::fs::read_to_string(root.join("docs/operator-guide.md")).unwrap();
    let named: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .map(|url| url.strip_prefix("file://").expect("a file:// URL"))
        .collect();
    assert!(!named.is_empty());
    // `install -t DIR FILE...`: FILE lands at DIR/<its name>; a glob names every file of its folder.
    let installed: Vec<String> = guide
        .lines()
        .filter(|l| l.starts_with("sudo install ") && l.contains(" -t "))
        .flat_map(|l| {
            let words: Vec<&str> = l
                .split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let at = words.iter().position(|w| *w == "-t").unwrap();
            let dir = words[at + 1].to_owned();
            words[at + 2..]
                .iter()
                .flat_map(|w| match w.strip_suffix("*.md") {
                    Some(folder) => std::fs::read_dir(root.join(folder))
                        .unwrap()
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect(),
                    None => vec![
                        std::path::Path::new(w)
                            .file_name()
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    ],
                })
                .map(|name| format!("{dir}/{name}"))
                .collect::<Vec<_>>()
        })
        .collect();
    for path in named {
        assert!(
            installed.iter().any(|i| i == path),
            "no install step puts {path} in place: {installed:?}"
        );
    }
}
