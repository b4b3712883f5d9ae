//! Consumer certificates and the handshake: stale CRLs named and enforced, the alert of a refused handshake
//! reaching the client (and naming the right cause), CA names too large for one handshake message, the server's
//! cipher order, a certificate matched by SAN alone, and rustls' consumer-triggered warnings kept out of the log.
//! The real `ssp serve` binary; curl and openssl as clients. Loopback only, every wait bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------------------------
// Stale CRLs.

/// A CRL past its nextUpdate: check-config names it, the proxy logs it at start, `/metrics` shows its nextUpdate,
/// and a handshake whose revocation status rests on it is refused (fail closed).
#[tokio::test]
async fn an_expired_crl_is_named_and_refuses_handshakes() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let feb_2020 = time::macros::datetime!(2020-02-01 00:00 UTC);
    write_crl(&pki, "stale.crl", feb_2020, &[]);
    let setup = Setup {
        crl: "certs/stale.crl",
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("stale.crl: CRL expired (nextUpdate 2020-02-01T00:00:00Z)"),
        "{text}"
    );

    let ssp = Logged::start(&pki, provider.addr, setup).await;
    ssp.wait_for_log("stale.crl: CRL expired").await;
    let refused = handshake(&pki, "consumer", ssp.served.addr).await;
    assert!(
        refused.is_err(),
        "a handshake resting on a stale CRL completed"
    );
    let metrics = ssp.metrics().await;
    assert!(
        metrics.contains("ssp_crl_next_update_timestamp_seconds{crl=\"stale.crl\"} 1580515200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ssp_tls_handshake_failures_total{reason=\"crl_expired\"} 1"),
        "{metrics}"
    );
}

/// `server.crl_expired = "allow"`: check-config passes with a warning, the proxy serves and says so at error, in
/// a log without colour codes (stderr is not a terminal).
#[tokio::test]
async fn crl_expired_allow_keeps_serving_loudly() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    write_crl(
        &pki,
        "stale.crl",
        time::macros::datetime!(2020-02-01 00:00 UTC),
        &[],
    );
    let setup = Setup {
        crl: "certs/stale.crl",
        extra_server: "crl_expired = \"allow\"".into(),
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("warning: server.crl:") && text.contains("server.crl_expired = \"allow\""),
        "{text}"
    );
    let ssp = Logged::start(&pki, provider.addr, setup).await;
    let log = ssp.wait_for_log("stale CRL trusted").await;
    assert!(log.contains("ERROR"), "{log}");
    // Not a terminal (a file here, the journal under systemd): no colour codes.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    handshake(&pki, "consumer", ssp.served.addr).await.unwrap();
}

/// A CRL within 24 hours of its nextUpdate is a check-config warning; once it passes while the proxy runs, the
/// proxy logs it and refuses new handshakes that rest on it.
#[tokio::test]
async fn a_crl_expiring_while_running_is_logged_and_enforced() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    write_crl(&pki, "short.crl", soon, &["consumer-revoked"]);
    let setup = Setup {
        crl: "certs/short.crl",
        ..Setup::default()
    };
    let (code, text) = check_config(&pki, provider.addr, &setup).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is within 24 hours"), "{text}");
    let ssp = Logged::start(&pki, provider.addr, setup).await;
    handshake(&pki, "consumer", ssp.served.addr).await.unwrap();
    assert!(
        handshake(&pki, "consumer-revoked", ssp.served.addr)
            .await
            .is_err()
    );
    ssp.wait_for_log("CRL expired while running").await;
    assert!(handshake(&pki, "consumer", ssp.served.addr).await.is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// The alert of a refused handshake reaches the client.

/// curl over TLS 1.3 with a revoked, an expired and no client certificate names the alert every time.
#[tokio::test]
async fn curl_names_the_alert_of_a_refused_handshake() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let served = serve(&pki, provider.addr).await;
    let url = format!("https://127.0.0.1:{}/", served.addr.port());
    let ca = pki.path("ca.crt");
    let cases: [(Option<&str>, &str); 3] = [
        (Some("consumer-revoked"), "certificate revoked"),
        (Some("consumer-expired"), "certificate expired"),
        (None, "certificate required"),
    ];
    for (stem, alert) in cases {
        for round in 0..5 {
            let mut cmd = std::process::Command::new("curl");
            cmd.args(["-sS", "--tlsv1.3", "--max-time", "10", "--cacert"])
                .arg(&ca);
            if let Some(stem) = stem {
                cmd.arg("--cert")
                    .arg(pki.path(&format!("{stem}.crt")))
                    .arg("--key")
                    .arg(pki.path(&format!("{stem}.key")));
            }
            let out = cmd.arg(&url).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(stderr.contains(alert), "{stem:?} round {round}: {stderr}");
        }
    }
}

/// The alerts that would mislead a consumer's support staff are plain: a client certificate not valid yet and a
/// handshake refused for a stale CRL both get `certificate_unknown` (not `certificate_expired`, not `unknown_ca`),
/// while the metrics name the real cause.
#[tokio::test]
async fn not_yet_valid_and_stale_crl_refusals_send_certificate_unknown() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() + time::Duration::days(10);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(400);
    params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(pki.path("consumer-future.crt"), leaf.pem()).unwrap();
    std::fs::write(pki.path("consumer-future.key"), leaf_key.serialize_pem()).unwrap();
    write_crl(
        &pki,
        "stale.crl",
        time::macros::datetime!(2020-02-01 00:00 UTC),
        &[],
    );
    let ssp = Logged::start(
        &pki,
        provider.addr,
        Setup {
            crl: "certs/stale.crl",
            ..Setup::default()
        },
    )
    .await;
    let url = format!("https://127.0.0.1:{}/", ssp.served.addr.port());
    for (stem, misleading) in [
        ("consumer-future", "certificate expired"),
        ("consumer", "unknown ca"),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--tlsv1.3", "--max-time", "10", "--cacert"])
            .arg(pki.path("ca.crt"))
            .arg("--cert")
            .arg(pki.path(&format!("{stem}.crt")))
            .arg("--key")
            .arg(pki.path(&format!("{stem}.key")))
            .arg(&url)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        assert!(!out.status.success());
        assert!(stderr.contains("certificate unknown"), "{stem}: {stderr}");
        assert!(!stderr.contains(misleading), "{stem}: {stderr}");
    }
    // The client may see the alert before the proxy has counted the failure: wait for the count.
    let deadline = Instant::now() + STEP;
    loop {
        let metrics = ssp.metrics().await;
        let counted = metrics
            .contains("ssp_tls_handshake_failures_total{reason=\"certificate_not_yet_valid\"} 1")
            && metrics.contains("ssp_tls_handshake_failures_total{reason=\"crl_expired\"} 1");
        if counted {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// CA names too large for a handshake.

/// 450 CAs with long names (more than 64 KiB of names): check-config refuses it with the size, unless
/// `server.client_ca_hints = false`, with which a consumer completes its handshake.
#[tokio::test]
async fn client_ca_names_too_large_for_one_message_are_refused_or_not_sent() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let mut bundle = std::fs::read_to_string(pki.path("ca.crt")).unwrap();
    let padding = "x".repeat(150);
    for i in 0..450 {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("padding CA {i} {padding}"),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        bundle.push_str(&params.self_signed(&key).unwrap().pem());
    }
    std::fs::write(pki.path("many-cas.crt"), bundle).unwrap();
    let write = |extra: &str, admin_port: SocketAddr| {
        let setup = Setup {
            extra_server: extra.into(),
            ..Setup::default()
        };
        let path = write_config(
            &pki,
            provider.addr,
            admin_port,
            "127.0.0.1:0".parse().unwrap(),
            &setup,
        );
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "client_ca = [\"certs/ca.crt\"]",
            "client_ca = [\"certs/many-cas.crt\"]",
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let down = closed_port().await;
    let config = write("", down);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("server.client_ca: the names of its 451 CAs take"),
        "{text}"
    );
    assert!(text.contains("server.client_ca_hints = false"), "{text}");

    let config = write("client_ca_hints = false", down);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    let served_config = ssp::config::Config::load(&config).unwrap();
    let tls = ssp::tls::server_config(&served_config.server).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.shutdown().await.unwrap();
    });
    // OpenSSL, the client that failed on the oversized CertificateRequest.
    let out = tokio::task::spawn_blocking({
        let (cert, key, ca) = (
            pki.path("consumer.crt"),
            pki.path("consumer.key"),
            pki.path("ca.crt"),
        );
        move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-quiet",
                    "-verify_return_error",
                ])
                .arg("-cert")
                .arg(cert)
                .arg("-key")
                .arg(key)
                .arg("-CAfile")
                .arg(ca)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The window just under 64 KiB of names: names that fit the 16-bit list but not TLS 1.3's extensions block (where
/// rustls would panic on every handshake) or a rustls client's 64 KiB flight buffer are refused; names just under
/// ssp's bound complete a TLS 1.3 handshake with a rustls client.
#[tokio::test]
async fn client_ca_names_near_the_limit() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    let dn_bytes = |pem: &str| -> usize {
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        2 + x509.subject().as_raw().len()
    };
    let dev_ca = std::fs::read_to_string(pki.path("ca.crt")).unwrap();
    let padding = "y".repeat(200);
    let mut extra: Vec<String> = Vec::new();
    let (mut fits, mut window) = (None, None);
    let mut total = dn_bytes(&dev_ca);
    for i in 0.. {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("window CA {i} {padding}"),
        );
        let pem = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let size = dn_bytes(&pem);
        if fits.is_none() && total + size > ssp::tls::MAX_CA_HINT_BYTES {
            fits = Some((dev_ca.clone() + extra.concat().as_str(), total));
        }
        extra.push(pem);
        total += size;
        if window.is_none() && total > ssp::tls::MAX_CA_HINT_BYTES {
            window = Some((dev_ca.clone() + extra.concat().as_str(), total));
        }
        // The size that made rustls panic in TLS 1.3: within the 16-bit list, not within the extensions block.
        if total > 65_100 {
            break;
        }
    }
    let panics = (dev_ca.clone() + extra.concat().as_str(), total);
    let (fits, fits_total) = fits.unwrap();
    let (window, window_total) = window.unwrap();
    assert!(
        fits_total > 61_000 && window_total < 62_000,
        "{fits_total} {window_total}"
    );
    assert!(panics.1 <= 65_535, "{}", panics.1);
    let with_bundle = |name: &str, bundle: &str| {
        std::fs::write(pki.path(name), bundle).unwrap();
        let config = pki.dir.path().join("ssp.toml");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "client_ca = [\"certs/ca.crt\"]",
            &format!("client_ca = [\"certs/{name}\"]"),
        );
        std::fs::write(&config, text).unwrap();
        config
    };
    write_config(
        &pki,
        provider.addr,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        &Setup::default(),
    );
    for (name, (bundle, bytes)) in [
        ("window.crt", (window, window_total)),
        ("panics.crt", panics),
    ] {
        write_config(
            &pki,
            provider.addr,
            closed_port().await,
            "127.0.0.1:0".parse().unwrap(),
            &Setup::default(),
        );
        let config = with_bundle(name, &bundle);
        let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 64, "{bytes} bytes: {text}");
        assert!(text.contains(&format!("take {bytes} bytes")), "{text}");
    }

    // Just under the bound: served, and a TLS 1.3 handshake asks for a certificate and completes.
    let addr = closed_port().await;
    write_config(
        &pki,
        provider.addr,
        closed_port().await,
        addr,
        &Setup::default(),
    );
    let config = with_bundle("fits.crt", &fits);
    let (code, text) = ssp_cmd(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{fits_total} bytes: {text}");
    let mut child = std::process::Command::new(ssp_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + STEP;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = handshake(&pki, "consumer", addr).await;
    let _ = child.kill();
    let _ = child.wait();
    // The request itself is refused (check 3: no such target), but only after a completed handshake.
    assert!(got.is_ok(), "{fits_total} bytes of names: {got:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// Smaller edges.

/// The server's cipher-suite order wins over the client's.
#[tokio::test]
async fn the_servers_cipher_suite_order_wins() {
    let w = World::start().await;
    let provider = ssp::tls::provider();
    let mut chacha_first = (*provider).clone();
    chacha_first
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("CHACHA20"));
    let roots = ssp::tls::load_roots("ca", &w.pki.ca()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(chacha_first))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            ssp::tls::load_certs("c", &w.pki.path("consumer.crt")).unwrap(),
            ssp::tls::load_key("k", &w.pki.path("consumer.key")).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(w.proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::IpAddress(w.proxy.addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(format!("{:?}", suite.suite()), "TLS13_AES_256_GCM_SHA384");
}

/// A consumer certificate with no CN, whose DNS SAN is the registered FQDN: permitted, and the request record
/// names the SAN that check 5 matched.
#[tokio::test]
async fn a_certificate_without_cn_is_recorded_by_its_matching_san() {
    let w = World::start().await;
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(w.pki.path("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(w.pki.path("ca.crt")).unwrap(),
        key,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(vec![CONSUMER_NAME.to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "no common name");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(w.pki.path("nocn.crt"), cert.pem()).unwrap();
    std::fs::write(w.pki.path("nocn.key"), leaf_key.serialize_pem()).unwrap();
    let consumer = Consumer::new(&w.pki, Some("nocn"), w.proxy.addr, false);
    let req = ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
        .body(empty())
        .unwrap();
    let answer = within("nocn", consumer.fetch(req)).await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let records = w.records(1).await;
    assert_eq!(records[0]["fqdn"], CONSUMER_NAME, "{}", records[0]);
    assert_eq!(records[0]["peer"]["subject"], "O=no common name");
}

/// What any client can make rustls warn about (an IP address as SNI) does not reach the operator's log by default;
/// with `RUST_LOG` naming rustls it does (so the input does make rustls warn).
#[tokio::test]
async fn rustls_warnings_a_consumer_triggers_are_not_logged() {
    let pki = Pki::generate();
    let provider = Provider::start(&pki).await;
    for (rust_log, expect_warning) in [(None, false), (Some("info,rustls=warn"), true)] {
        let addr = closed_port().await;
        let config = write_config(
            &pki,
            provider.addr,
            closed_port().await,
            addr,
            &Setup::default(),
        );
        let log = pki.dir.path().join("ssp.log");
        let mut cmd = std::process::Command::new(ssp_bin());
        cmd.args(["serve", "--config"]).arg(&config);
        match rust_log {
            None => cmd.env_remove("RUST_LOG"),
            Some(v) => cmd.env("RUST_LOG", v),
        };
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + STEP;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for _ in 0..5 {
            let out = std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr.to_string(),
                    "-servername",
                    "127.0.0.1",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(!out.stdout.is_empty());
        }
        // Each refused handshake (no client certificate) is logged by ssp at info: wait for the fifth.
        let deadline = Instant::now() + STEP;
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches("TLS handshake refused").count() >= 5 || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(text.matches("TLS handshake refused").count() >= 5, "{text}");
        assert_eq!(
            text.contains("Illegal SNI"),
            expect_warning,
            "RUST_LOG {rust_log:?}: {text}"
        );
    }
}
