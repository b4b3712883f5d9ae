//! Helpers for the tests that drive the real binary by hand: raw request heads, reading to the close, a binary
//! whose log goes to a file, CRLs of the test PKI, `check-config` runs and bare handshakes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// The head of a valid metadata request for `w`'s provider, without the final blank line, so that a test can add
/// fields of its own.
pub fn request_head(url: &str, method: &str, extra: &str) -> String {
    let path = format!("/{url}/fhir/metadata");
    format!(
        "{method} {path} HTTP/1.1\r\nHost: ssp.dev.localhost\r\nSsp-TraceID: {TRACE_ID}\r\nSsp-From: {FROM}\r\n\
         Ssp-To: {TO}\r\nSsp-InteractionID: {METADATA}\r\nAuthorization: {}\r\n{extra}",
        bearer(&claims(&audience(&path), METADATA))
    )
}

/// Reads until the server closes the connection (close_notify or EOF); returns what arrived and how it ended.
pub async fn read_to_close(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (String, Result<(), String>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Err(e.to_string()),
                );
            }
        }
    }
}

/// `ssp serve` with its operational log in a file, and its admin listener on a known port.
pub struct Logged {
    pub served: Served,
    pub log: PathBuf,
    pub admin: SocketAddr,
}

impl Logged {
    pub async fn start(pki: &Pki, provider: SocketAddr, mut setup: Setup) -> Self {
        let admin = closed_port().await;
        setup.admin = admin.to_string();
        let log = pki.dir.path().join("ssp.log");
        let file = std::fs::File::create(&log).unwrap();
        let served = serve_setup(pki, provider, &setup, &[], file.into()).await;
        Self { served, log, admin }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log holds `text`.
    pub async fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        metrics_text(self.admin).await
    }
}

/// A CRL from the PKI's CA with this nextUpdate, revoking `revoked` (certificate stems), written to `name`.
pub fn write_crl(
    pki: &Pki,
    name: &str,
    next_update: time::OffsetDateTime,
    revoked: &[&str],
) -> PathBuf {
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path("ca.crt")).unwrap(), key)
            .unwrap();
    let revoked_certs = revoked
        .iter()
        .map(|stem| {
            let der = ssp::tls::load_certs("c", &pki.path(&format!("{stem}.crt"))).unwrap();
            let (_, x509) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
            rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(x509.raw_serial()),
                revocation_time: next_update - time::Duration::days(30),
                reason_code: None,
                invalidity_date: None,
            }
        })
        .collect();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: next_update - time::Duration::days(30),
        next_update,
        crl_number: rcgen::SerialNumber::from(7u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap();
    let path = pki.path(name);
    std::fs::write(&path, crl.pem().unwrap()).unwrap();
    path
}

/// `ssp check-config` on a config written for `setup`: exit code, and stdout and stderr together.
pub async fn check_config(pki: &Pki, provider: SocketAddr, setup: &Setup) -> (i32, String) {
    let config = write_config(
        pki,
        provider,
        closed_port().await,
        "127.0.0.1:0".parse().unwrap(),
        setup,
    );
    ssp_cmd(&["check-config", "--config", config.to_str().unwrap()])
}

/// A TLS handshake (and for TLS 1.3 the first read, where a refused client certificate shows) with a fresh client
/// config, so that no session is resumed.
pub async fn handshake(pki: &Pki, stem: &str, addr: SocketAddr) -> Result<(), String> {
    let consumer = Consumer::new(pki, Some(stem), addr, false);
    let sender = consumer.connect().await;
    let mut sender = sender?;
    let req = ssp_request(Method::GET, "/https://nowhere.invalid/gp", METADATA)
        .body(empty())
        .unwrap();
    sender.send(req).await.map(|_| ())
}
