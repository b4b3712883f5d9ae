//! TLS material and configs for both legs: loading PEM certificates, keys and CRLs, building the consumer-facing
//! `ServerConfig` (client certificates required, CRLs, allowed versions, ALPN h2 + http/1.1) and the upstream
//! `ClientConfig` (the proxy's own client certificate, provider roots), and reading a peer's identity once per
//! connection.
//!
//! Exactly one crypto provider (aws-lc-rs) is used and passed explicitly. Building returns problems naming the
//! config key and file; it never panics on bad material. Knows nothing of HTTP.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::{CrlExpired, Problems, ServerConfig, TlsVersion, UpstreamConfig};
use crate::hex::hex;
use crate::ids::PeerIdentity;

/// The one crypto provider, aws-lc-rs with its default suites: in TLS 1.2 only ECDHE with AES-GCM or ChaCha20
/// (the GP Connect list's DHE and CBC suites are deliberately not offered).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loads a PEM certificate chain (leaf first); `key` names the config key for the error line.
pub fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key}: {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {}: no CERTIFICATE in the file",
            path.display()
        ));
    }
    for cert in &certs {
        if x509_parser::parse_x509_certificate(cert).is_err() {
            return Err(format!(
                "{key}: {}: a certificate does not parse as X.509",
                path.display()
            ));
        }
    }
    Ok(certs)
}

/// Loads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{key}: {}: no usable private key: {e}", path.display()))
}

/// Loads PEM CRLs from every file.
pub(crate) fn load_crls(
    key: &str,
    paths: &[impl AsRef<Path>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut crls = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let before = crls.len();
        for crl in CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| format!("{key}: {}: {e}", path.display()))?
        {
            crls.push(
                crl.map_err(|e| format!("{key}: {}: not a PEM CRL file: {e}", path.display()))?,
            );
        }
        if crls.len() == before {
            return Err(format!(
                "{key}: {}: no X509 CRL in the file",
                path.display()
            ));
        }
    }
    Ok(crls)
}

/// Loads trust anchors from every file.
pub fn load_roots(key: &str, paths: &[impl AsRef<Path>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let path = path.as_ref();
        for cert in load_certs(key, path)? {
            roots.add(cert).map_err(|e| {
                format!(
                    "{key}: {}: not a usable CA certificate: {e}",
                    path.display()
                )
            })?;
        }
    }
    Ok(roots)
}

pub(crate) fn versions(list: &[TlsVersion]) -> Vec<&'static SupportedProtocolVersion> {
    list.iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect()
}

/// Runs each loader, keeping every failure, so one run names all bad files.
struct Collect(Vec<String>);

impl Collect {
    fn take<T>(&mut self, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }
}

/// Most bytes of CA names (each with its 2-byte length) sent in a CertificateRequest: 60 KiB. The names list has
/// a 16-bit length (RFC 5246 section 7.4.4); in TLS 1.3 it sits inside the message's extensions block, whose 16-bit
/// length also covers the extension headers and `signature_algorithms` (RFC 8446 section 4.3.2), and clients
/// built on rustls buffer a whole handshake flight (this message, the server's certificate, its signature) in
/// 64 KiB. 4 KiB are left for all of that.
pub const MAX_CA_HINT_BYTES: usize = 60 * 1024;

/// Bytes the names of `roots` take in a CertificateRequest.
fn ca_hint_bytes(roots: &RootCertStore) -> usize {
    roots
        .subjects()
        .iter()
        .map(|dn| 2 + dn.as_ref().len())
        .sum()
}

/// Builds the consumer-facing config: client certificates required and chained to `client_ca`; when CRLs are
/// configured, the client certificate's revocation status must be known from them (an unknown status refuses
/// the handshake), and with `server.crl_expired = "refuse"` from a CRL whose nextUpdate has not passed. The
/// server's cipher-suite order wins. With `server.client_ca_hints` on, CA names that do not fit in one TLS message
/// are a problem naming their size.
pub fn server_config(cfg: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, Problems> {
    let mut c = Collect(Vec::new());
    let chain = c.take(load_certs("server.cert", &cfg.cert));
    let key = c.take(load_key("server.key", &cfg.key));
    let roots = c.take(load_roots("server.client_ca", &cfg.client_ca));
    let crls = c.take(load_crls("server.crl", &cfg.crl));
    let (Some(chain), Some(key), Some(roots), Some(crls)) = (chain, key, roots, crls) else {
        return Err(Problems { problems: c.0 });
    };
    let hint_bytes = ca_hint_bytes(&roots);
    if cfg.client_ca_hints && hint_bytes > MAX_CA_HINT_BYTES {
        return Err(Problems::one(format!(
            "server.client_ca: the names of its {} CAs take {hint_bytes} bytes in each CertificateRequest, more \
             than fits in one with room for the rest of the handshake ({MAX_CA_HINT_BYTES}): handshakes would fail; \
             use fewer CAs or set server.client_ca_hints = false",
            roots.len()
        )));
    }
    let provider = provider();
    let verifier = build_client_verifier(cfg, roots, crls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions(&cfg.tls_versions))
        .map_err(|e| Problems::one(format!("server.tls_versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            Problems::one(pair_problem(
                ("server.cert", &cfg.cert),
                ("server.key", &cfg.key),
                &e,
            ))
        })?;
    // `http/1.0` too: curl's `--http1.0` offers only it, and a server that knows none of the client's protocols
    // must refuse the handshake (RFC 7301 section 3.2).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Check 1's verifier, as the consumer listener uses it (`server.client_ca`, `server.crl`, `server.crl_expired`,
/// [`PlainAlerts`]): `ssp onboard check` verifies a chain with it, so its verdict is the handshake's. Errors: one
/// problem per unreadable file, naming its config key, or the verifier's refusal of the material.
pub(crate) fn client_verifier(
    cfg: &ServerConfig,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Problems> {
    let mut c = Collect(Vec::new());
    let roots = c.take(load_roots("server.client_ca", &cfg.client_ca));
    let crls = c.take(load_crls("server.crl", &cfg.crl));
    let (Some(roots), Some(crls)) = (roots, crls) else {
        return Err(Problems { problems: c.0 });
    };
    build_client_verifier(cfg, roots, crls)
}

fn build_client_verifier(
    cfg: &ServerConfig,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Problems> {
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
        if cfg.crl_expired == CrlExpired::Refuse {
            verifier = verifier.enforce_revocation_expiration();
        }
    }
    if !cfg.client_ca_hints {
        verifier = verifier.clear_root_hint_subjects();
    }
    let verifier = verifier
        .build()
        .map_err(|e| Problems::one(format!("server.client_ca / server.crl: {e}")))?;
    Ok(Arc::new(PlainAlerts(verifier)))
}

/// One `server.crl` file and when it goes stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CrlFile {
    pub path: std::path::PathBuf,
    /// Its label in `ssp_crl_next_update_timestamp_seconds`: the file name.
    pub label: String,
    /// The earliest nextUpdate of the CRLs in it (Unix seconds); `None` when none of them has one (RFC 5280
    /// section 5.1.2.5 makes it optional).
    pub next_update: Option<i64>,
}

/// Every `server.crl` file that can be read, with its earliest nextUpdate.
pub(crate) fn crl_files(cfg: &ServerConfig) -> Vec<CrlFile> {
    cfg.crl
        .iter()
        .filter_map(|path| {
            let crls = load_crls("server.crl", &[path]).ok()?;
            let next_update = crls
                .iter()
                .filter_map(|der| {
                    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
                    crl.next_update().map(|t| t.timestamp())
                })
                .min();
            Some(CrlFile {
                path: path.clone(),
                label: path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                next_update,
            })
        })
        .collect()
}

/// Seconds in the window before a CRL's nextUpdate in which `check-config` and the proxy warn.
pub(crate) const CRL_WARN_WINDOW_S: i64 = 86_400;

/// What is wrong with the CRLs at a moment, one line per file, by kind.
#[derive(Debug, Default)]
pub(crate) struct CrlReport {
    /// Past nextUpdate with `server.crl_expired = "refuse"`: every handshake resting on them fails.
    pub refused: Vec<String>,
    /// Past nextUpdate with `server.crl_expired = "allow"`: trusted anyway.
    pub trusted_stale: Vec<String>,
    /// nextUpdate within [`CRL_WARN_WINDOW_S`].
    pub expiring: Vec<String>,
}

/// The state of the CRLs at `now` (Unix seconds). `check-config` takes `refused` as problems and the rest as
/// warnings; the proxy logs the first two at error and `expiring` at warn.
pub(crate) fn crl_report(cfg: &ServerConfig, now: i64) -> CrlReport {
    let mut report = CrlReport::default();
    for crl in crl_files(cfg) {
        let Some(next) = crl.next_update else {
            continue;
        };
        let when = crate::clock::rfc3339_seconds(next);
        let path = crl.path.display();
        if next <= now {
            match cfg.crl_expired {
                CrlExpired::Refuse => report.refused.push(format!(
                    "server.crl: {path}: CRL expired (nextUpdate {when}): handshakes whose revocation status rests \
                     on it are refused (server.crl_expired = \"refuse\")"
                )),
                CrlExpired::Allow => report.trusted_stale.push(format!(
                    "server.crl: {path}: CRL expired (nextUpdate {when}): still trusted because \
                     server.crl_expired = \"allow\""
                )),
            }
        } else if next - now <= CRL_WARN_WINDOW_S {
            report.expiring.push(format!(
                "server.crl: {path}: CRL nextUpdate {when} is within 24 hours"
            ));
        }
    }
    report
}

/// Logs [`crl_report`] for now: an expired CRL at error, one close to expiry at warn.
pub(crate) fn log_crl_report(cfg: &ServerConfig) {
    let report = crl_report(cfg, crate::clock::unix_now());
    for line in report.refused {
        tracing::error!(problem = %line, "stale CRL");
    }
    for line in report.trusted_stale {
        tracing::error!(problem = %line, "stale CRL trusted (server.crl_expired = \"allow\")");
    }
    for line in report.expiring {
        tracing::warn!(problem = %line, "CRL close to its nextUpdate");
    }
}

/// Sleeps until each CRL in force passes its nextUpdate and logs it then; `crls` changes on reload.
pub(crate) async fn watch_crl_expiry(
    mut crls: tokio::sync::watch::Receiver<Vec<CrlFile>>,
    mode: CrlExpired,
) {
    loop {
        let now = crate::clock::unix_now();
        let next = crls
            .borrow_and_update()
            .iter()
            .filter_map(|c| c.next_update.map(|n| (n, c.path.clone())))
            .filter(|(n, _)| *n > now)
            .min();
        let changed = crls.changed();
        match next {
            None => {
                if changed.await.is_err() {
                    return;
                }
            }
            Some((at, path)) => {
                let wait = std::time::Duration::from_secs((at - now).max(0) as u64 + 1);
                tokio::select! {
                    result = changed => if result.is_err() { return },
                    () = tokio::time::sleep(wait) => match mode {
                        CrlExpired::Refuse => tracing::error!(
                            crl = %path.display(),
                            "CRL expired while running: handshakes whose revocation status rests on it are now refused"
                        ),
                        CrlExpired::Allow => tracing::error!(
                            crl = %path.display(),
                            "CRL expired while running: still trusted because server.crl_expired = \"allow\""
                        ),
                    },
                }
            }
        }
    }
}

/// Builds the upstream config: the proxy's own client certificate, providers verified against `upstream.ca`
/// and the target host name, HTTP/1.1 only.
pub(crate) fn client_config(cfg: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, Problems> {
    let mut c = Collect(Vec::new());
    let chain = c.take(load_certs("upstream.cert", &cfg.cert));
    let key = c.take(load_key("upstream.key", &cfg.key));
    let roots = c.take(load_roots("upstream.ca", &cfg.ca));
    let (Some(chain), Some(key), Some(roots)) = (chain, key, roots) else {
        return Err(Problems { problems: c.0 });
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Problems::one(format!("upstream: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            Problems::one(pair_problem(
                ("upstream.cert", &cfg.cert),
                ("upstream.key", &cfg.key),
                &e,
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS material in force on both legs, swapped whole on reload. The listener reads the server config once per
/// accepted connection and the upstream connector the client config once per new provider connection, so a reload
/// applies to every new handshake while established connections (and the upstream pool) carry on. A new server
/// config brings a new, empty session cache: a client whose certificate was revoked cannot resume a session
/// negotiated before the reload.
#[derive(Debug)]
pub struct Reloadable {
    server: arc_swap::ArcSwap<rustls::ServerConfig>,
    client: arc_swap::ArcSwap<rustls::ClientConfig>,
    /// The CRL files in force and their nextUpdate, for the expiry watch and the metric.
    crls: tokio::sync::watch::Sender<Vec<CrlFile>>,
}

impl Reloadable {
    pub(crate) fn new(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        crls: Vec<CrlFile>,
    ) -> Self {
        Self {
            server: arc_swap::ArcSwap::new(server),
            client: arc_swap::ArcSwap::new(client),
            crls: tokio::sync::watch::Sender::new(crls),
        }
    }

    /// The CRL files in force, updated on each reload.
    pub(crate) fn crls(&self) -> tokio::sync::watch::Receiver<Vec<CrlFile>> {
        self.crls.subscribe()
    }

    pub(crate) fn server(&self) -> Arc<rustls::ServerConfig> {
        self.server.load_full()
    }

    pub(crate) fn client(&self) -> Arc<rustls::ClientConfig> {
        self.client.load_full()
    }

    /// Re-reads the certificates, keys, CA files and CRLs named by `server` and `upstream` and puts them in force;
    /// if any of them is bad, nothing changes and every problem is returned.
    pub(crate) fn reload(
        &self,
        server: &ServerConfig,
        upstream: &UpstreamConfig,
    ) -> Result<(), Problems> {
        let new_server = server_config(server);
        let new_client = client_config(upstream);
        match (new_server, new_client) {
            (Ok(s), Ok(c)) => {
                self.server.store(s);
                self.client.store(c);
                self.crls.send_replace(crl_files(server));
                Ok(())
            }
            (s, c) => {
                let mut problems = Vec::new();
                for p in [s.err(), c.err()].into_iter().flatten() {
                    problems.extend(p.problems);
                }
                Err(Problems { problems })
            }
        }
    }
}

/// Reads subject, CN, DNS SANs, serial, SHA-256 fingerprint, issuer and notAfter from a (verified) DER certificate.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let common_name = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let dns_sans = match x509.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(name) => Some((*name).to_owned()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(PeerIdentity {
        subject: x509.subject().to_string(),
        common_name,
        dns_sans,
        serial: hex(x509.raw_serial()),
        fingerprint_sha256: hex(&Sha256::digest(cert.as_ref())),
        issuer: x509.issuer().to_string(),
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// The `notAfter` of the first certificate in a PEM file, as a Unix timestamp (for expiry warnings).
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// WebPKI's client certificate verifier, with two of its refusals sent to the consumer as `certificate_unknown`
/// rather than the alerts rustls chooses (RFC 8446 section 6.2): a certificate that is not valid yet would be
/// `certificate_expired`, and one whose revocation status rests on a CRL past its nextUpdate `unknown_ca` (as
/// OpenSSL does). Both send a consumer's support staff after the wrong cause; the proxy's log and
/// `ssp_tls_handshake_failures_total` name the real one ([`UnknownToConsumer`]).
#[derive(Debug)]
struct PlainAlerts(Arc<dyn rustls::server::danger::ClientCertVerifier>);

/// The client certificate refusals [`PlainAlerts`] sends as `certificate_unknown`, kept as the error's cause so
/// that the log and the metrics name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnknownToConsumer {
    /// The certificate's notBefore is still to come.
    NotYetValid,
    /// Its revocation status rests on a CRL past its nextUpdate (`server.crl_expired = "refuse"`).
    StaleCrl,
}

impl std::fmt::Display for UnknownToConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnknownToConsumer::NotYetValid => {
                "client certificate not valid yet (its notBefore is in the future)"
            }
            UnknownToConsumer::StaleCrl => {
                "revocation status unknown: the CRL is past its nextUpdate"
            }
        })
    }
}

impl std::error::Error for UnknownToConsumer {}

impl rustls::server::danger::ClientCertVerifier for PlainAlerts {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        use rustls::CertificateError as E;
        let other = |e: Arc<dyn std::error::Error + Send + Sync>| {
            rustls::Error::InvalidCertificate(E::Other(rustls::OtherError(e)))
        };
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    E::NotValidYet | E::NotValidYetContext { .. },
                ) => other(Arc::new(UnknownToConsumer::NotYetValid)),
                rustls::Error::InvalidCertificate(
                    E::ExpiredRevocationList | E::ExpiredRevocationListContext { .. },
                ) => other(Arc::new(UnknownToConsumer::StaleCrl)),
                e => e,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A certificate's `notBefore`, in Unix seconds.
pub(crate) fn not_before(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_before.timestamp())
}

/// The text of a certificate and key pair that cannot be used together: a key that is not the certificate's
/// names both files; any other error is rustls' own.
fn pair_problem(
    (cert_key, cert): (&str, &Path),
    (key_key, key): (&str, &Path),
    e: &rustls::Error,
) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{key_key} {} is not the private key of {cert_key} {}",
            key.display(),
            cert.display()
        ),
        e => format!("{cert_key} / {key_key}: {}: {e}", cert.display()),
    }
}

/// A bounded reason label for a refused TLS handshake (one of `metrics::TLS_FAILURE_REASONS`), from the rustls
/// error inside the handshake's I/O error.
pub(crate) fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    certificate_failure_reason(tls)
}

/// The reason label of a rustls error ([`failure_reason`] without the I/O wrapping).
pub(crate) fn certificate_failure_reason(tls: &rustls::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match tls {
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<UnknownToConsumer>() {
                Some(UnknownToConsumer::NotYetValid) => "certificate_not_yet_valid",
                Some(UnknownToConsumer::StaleCrl) => "crl_expired",
                None => "certificate_invalid",
            }
        }
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Revoked) => "certificate_revoked",
        Error::InvalidCertificate(
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. },
        ) => "crl_expired",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "certificate_expired",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(_) => "certificate_invalid",
        Error::PeerIncompatible(_) => "incompatible",
        Error::InappropriateHandshakeMessage { .. } | Error::InappropriateMessage { .. } => {
            "protocol"
        }
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named_with_their_key() {
        let err = load_certs("server.cert", Path::new("/nonexistent/x.crt")).unwrap_err();
        assert!(err.starts_with("server.cert: /nonexistent/x.crt:"), "{err}");
        let err = load_key("upstream.key", Path::new("/nonexistent/x.key")).unwrap_err();
        assert!(
            err.starts_with("upstream.key: /nonexistent/x.key:"),
            "{err}"
        );
    }
}
