//! Certificate and CRL rotation: a reload puts new material in force for new handshakes, a newly revoked client is
//! refused even though its client would resume an earlier session, an exchange in flight completes, and bad
//! material is refused whole.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: a failed step is a test failure"
)]

mod support;

use std::path::Path;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use rustls_pki_types::CertificateDer;
use support::*;

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn serial_of(path: &Path) -> rcgen::SerialNumber {
    let certs = ssp::tls::load_certs("c", path).unwrap();
    rcgen::SerialNumber::from_slice(&unhex(&ssp::tls::peer_identity(&certs[0]).unwrap().serial))
}

/// Issues a new proxy server certificate from the same CA and a CRL that also revokes `consumer`; returns the new
/// server certificate.
fn rotate(certs: &Path) -> CertificateDer<'static> {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(certs.join("ca.crt")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ssp.dev.localhost (rotated)");
    params.subject_alt_names = vec![
        rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
        rcgen::SanType::DnsName("localhost".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(certs.join("proxy-server.crt"), cert.pem()).unwrap();
    std::fs::write(certs.join("proxy-server.key"), key.serialize_pem()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let revoked = |path: &str| rcgen::RevokedCertParams {
        serial_number: serial_of(&certs.join(path)),
        revocation_time: now - time::Duration::minutes(1),
        reason_code: Some(rcgen::RevocationReason::KeyCompromise),
        invalidity_date: None,
    };
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(30),
        crl_number: rcgen::SerialNumber::from(2u64),
        issuing_distribution_point: None,
        revoked_certs: vec![revoked("consumer-revoked.crt"), revoked("consumer.crt")],
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    std::fs::write(certs.join("ca.crl"), crl.pem().unwrap()).unwrap();
    cert.der().clone()
}

/// The server certificate a fresh handshake presents, and whether that handshake resumed a session.
async fn handshake(consumer: &Consumer) -> (CertificateDer<'static>, bool) {
    let tls = consumer.tls().await;
    let conn = tls.get_ref().1;
    let cert = conn.peer_certificates().unwrap()[0].clone().into_owned();
    (
        cert,
        conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    )
}

/// Rotation on reload: new handshakes see the new certificate; a newly revoked consumer is refused although its
/// client holds a session it resumed before; a download started before the reload completes; bad material is
/// refused whole and the running certificates stay.
#[tokio::test]
async fn certificates_and_crls_rotate_on_reload() {
    let w = World::start().await;
    let certs = w.pki.dir.path().join("certs");
    let get = |w: &World| {
        ssp_request(Method::GET, &format!("/{}/fhir/metadata", w.url), METADATA)
            .body(empty())
            .unwrap()
    };

    let consumer = w.consumer("consumer");
    let (old_cert, _) = handshake(&consumer).await;
    // A whole exchange reads the TLS 1.3 session tickets the server sends after the handshake.
    assert_eq!(
        within("before", consumer.fetch(get(&w)))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let (_, resumed) = handshake(&consumer).await;
    assert!(
        resumed,
        "the consumer's client resumes sessions: the revocation check below must defeat that"
    );

    let slow = w.get("/fhir/slow").await;
    let mut body = slow.into_body();
    assert_eq!(
        within("first", body.frame())
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap(),
        "first,"
    );

    let new_cert = rotate(&certs);
    ssp::lifecycle::reload_tls(&w.config, &w.tls, &w.metrics)
        .await
        .unwrap();

    let other = w.consumer("consumer2");
    let (seen, _) = handshake(&other).await;
    assert_ne!(seen, old_cert);
    assert_eq!(seen, new_cert, "new handshakes present the new certificate");
    let refused = within("revoked", consumer.fetch(get(&w))).await;
    assert!(
        refused.is_err(),
        "a revoked client got through: {refused:?}"
    );

    w.provider.state.release_slow.notify_one();
    assert_eq!(
        within("rest", body.collect()).await.unwrap().to_bytes(),
        "last"
    );

    std::fs::write(certs.join("proxy-server.key"), "not a key").unwrap();
    let err = ssp::lifecycle::reload_tls(&w.config, &w.tls, &w.metrics)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    assert_eq!(
        handshake(&other).await.0,
        new_cert,
        "refused material must not replace the running one"
    );
    let mut req = get(&w);
    req.headers_mut()
        .insert("Ssp-From", FROM_2.parse().unwrap());
    // consumer2 is served (its request is then refused by policy at check 8, which proves it reached HTTP).
    assert_eq!(
        within("after", other.fetch(req)).await.unwrap().status,
        StatusCode::FORBIDDEN
    );
}
