//! `ssp dev-certs`: a development PKI, FOR DEVELOPMENT AND TESTS ONLY. A CA and its CRL, the proxy's server and
//! client certificates, two consumer certificates with different FQDNs, a provider server certificate, and one
//! revoked and one expired consumer certificate. ECDSA P-256 keys by default (RSA-2048 on request, as the load
//! benchmark uses to match the reference figures), valid for 10 years (except the expired one).
//!
//! The committed `certs-dev/` folder is its output; tests generate fresh ones into temporary folders.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Printed into every generated folder and certificate organisation name.
pub(crate) const WARNING: &str = "ssp development PKI - NOT FOR PRODUCTION";

/// Names the generated leaf certificates carry; the dev policy and config refer to them.
pub(crate) const PROXY_SERVER_NAME: &str = "ssp.dev.localhost";
pub const PROXY_CLIENT_NAME: &str = "ssp-client.dev.localhost";
pub const CONSUMER_NAME: &str = "consumer.dev.localhost";
pub const CONSUMER2_NAME: &str = "consumer2.dev.localhost";
pub(crate) const PROVIDER_NAME: &str = "provider.dev.localhost";
pub(crate) const PROVIDER2_NAME: &str = "provider2.dev.localhost";

/// What to issue: file stem, subject CN, extra DNS SANs, server or client use.
struct Leaf {
    stem: &'static str,
    cn: &'static str,
    extra_sans: &'static [&'static str],
    server: bool,
}

const LEAVES: &[Leaf] = &[
    Leaf {
        stem: "proxy-server",
        cn: PROXY_SERVER_NAME,
        extra_sans: &["localhost", "127.0.0.1", "::1"],
        server: true,
    },
    Leaf {
        stem: "proxy-client",
        cn: PROXY_CLIENT_NAME,
        extra_sans: &[],
        server: false,
    },
    Leaf {
        stem: "consumer",
        cn: CONSUMER_NAME,
        extra_sans: &[],
        server: false,
    },
    Leaf {
        stem: "consumer2",
        cn: CONSUMER2_NAME,
        extra_sans: &[],
        server: false,
    },
    Leaf {
        stem: "provider",
        cn: PROVIDER_NAME,
        extra_sans: &[PROVIDER2_NAME, "localhost"],
        server: true,
    },
    Leaf {
        stem: "consumer-revoked",
        cn: "revoked.dev.localhost",
        extra_sans: &[],
        server: false,
    },
];

/// The key type of every certificate in a generated PKI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

impl KeyKind {
    fn generate(self) -> Result<KeyPair, rcgen::Error> {
        match self {
            KeyKind::EcdsaP256 => KeyPair::generate(),
            KeyKind::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        }
    }
}

/// Generates the whole PKI into `dir` (created if missing) with ECDSA P-256 keys, overwriting files of the same
/// names. Returns the files written.
pub fn generate(dir: &Path) -> Result<Vec<PathBuf>, Box<dyn std::error::Error + Send + Sync>> {
    generate_with(dir, KeyKind::EcdsaP256)
}

/// As [`generate`], with keys of `kind`.
pub fn generate_with(
    dir: &Path,
    kind: KeyKind,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error + Send + Sync>> {
    std::fs::create_dir_all(dir)?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::days(1);
    let not_after = now + Duration::days(3653);
    let mut written = Vec::new();
    let mut write = |name: &str, text: &str, secret: bool| -> std::io::Result<()> {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), secret)?;
        written.push(path);
        Ok(())
    };

    let ca_key = kind.generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = name("ssp development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    ca.serial_number = Some(random_serial());
    let ca_cert = ca.self_signed(&ca_key)?;
    write("ca.crt", &ca_cert.pem(), false)?;
    write("ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let mut revoked_serial = None;
    for leaf in LEAVES {
        let serial = random_serial();
        if leaf.stem == "consumer-revoked" {
            revoked_serial = Some(serial.clone());
        }
        let (cert, key) = issue(leaf, serial, not_before, not_after, &issuer, kind)?;
        write(&format!("{}.crt", leaf.stem), &cert, false)?;
        write(&format!("{}.key", leaf.stem), &key, true)?;
    }
    let expired = Leaf {
        stem: "consumer-expired",
        cn: "expired.dev.localhost",
        extra_sans: &[],
        server: false,
    };
    let (cert, key) = issue(
        &expired,
        random_serial(),
        now - Duration::days(400),
        now - Duration::days(35),
        &issuer,
        kind,
    )?;
    write("consumer-expired.crt", &cert, false)?;
    write("consumer-expired.key", &key, true)?;

    let crl = CertificateRevocationListParams {
        this_update: not_before,
        next_update: not_after,
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked_serial
            .into_iter()
            .map(|serial_number| RevokedCertParams {
                serial_number,
                revocation_time: not_before,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    write("ca.crl", &crl.pem()?, false)?;
    // The patient-facing door's two keys (EC P-256, PKCS#8): the dev NHS login's signing key, and the proxy's
    // key for its client assertions at the suppliers' token endpoints.
    write("nhs-login.key", &KeyPair::generate()?.serialize_pem(), true)?;
    write(
        "pf-assertion.key",
        &KeyPair::generate()?.serialize_pem(),
        true,
    )?;
    write(
        "README.txt",
        &format!(
            "{WARNING}\n\nGenerated by `ssp dev-certs --out DIR`. Every private key here is public: never trust\n\
             this CA outside a development machine. Regenerate with `cargo run -- dev-certs --out certs-dev`.\n\n\
             ca.crt / ca.key / ca.crl     the development CA, and its CRL revoking consumer-revoked\n\
             proxy-server.crt / .key      the proxy's consumer-facing certificate ({PROXY_SERVER_NAME}, localhost, 127.0.0.1, ::1)\n\
             proxy-client.crt / .key      the proxy's client certificate toward providers ({PROXY_CLIENT_NAME})\n\
             consumer.crt / .key          a consumer system ({CONSUMER_NAME})\n\
             consumer2.crt / .key         a second consumer system ({CONSUMER2_NAME})\n\
             provider.crt / .key          the dev provider ({PROVIDER_NAME}, {PROVIDER2_NAME}, localhost)\n\
             consumer-revoked.crt / .key  a consumer certificate listed in ca.crl\n\
             consumer-expired.crt / .key  a consumer certificate whose validity has ended\n\
             nhs-login.key                the dev NHS login's token signing key (the demo's patient tokens)\n\
             pf-assertion.key             the proxy's client assertion key for the suppliers' token endpoints\n"
        ),
        false,
    )?;
    Ok(written)
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, WARNING);
    dn.push(DnType::CommonName, cn);
    dn
}

/// Issues one leaf; returns (certificate PEM, key PEM).
fn issue(
    leaf: &Leaf,
    serial: SerialNumber,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    issuer: &Issuer<'_, &KeyPair>,
    kind: KeyKind,
) -> Result<(String, String), rcgen::Error> {
    let key = kind.generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(leaf.cn);
    params.subject_alt_names = std::iter::once(leaf.cn)
        .chain(leaf.extra_sans.iter().copied())
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if leaf.server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial);
    // Strict verifiers (`openssl verify -x509_strict`, Python 3.13's default context) require the Authority Key
    // Identifier on every certificate a CA issues (RFC 5280 section 4.2.1.1).
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A positive random 64-bit serial.
fn random_serial() -> SerialNumber {
    let mut bytes = uuid::Uuid::new_v4().as_bytes()[..8].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// Writes a file, mode 0600 for private keys, and fsyncs it.
fn write_file(path: &Path, data: &[u8], secret: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path)?;
    // `mode` applies only to a new file; an existing key file is tightened too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(if secret {
        0o600
    } else {
        0o644
    }))?;
    file.write_all(data)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// Each key kind gives certificates of that kind, which the TLS loaders accept.
    #[test]
    fn key_kinds() {
        for (kind, oid) in [
            (KeyKind::EcdsaP256, "1.2.840.10045.2.1"),
            (KeyKind::Rsa2048, "1.2.840.113549.1.1.1"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            generate_with(dir.path(), kind).unwrap();
            let certs = crate::tls::load_certs("c", &dir.path().join("proxy-server.crt")).unwrap();
            crate::tls::load_key("k", &dir.path().join("proxy-server.key")).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
            assert_eq!(cert.public_key().algorithm.algorithm.to_id_string(), oid);
        }
    }

    /// Every generated certificate passes OpenSSL's strict X.509 checks against the CA, as Python 3.13's default
    /// client and sslyze require (the shipped `certs-dev/` too, checked the same way in `tests/binary.rs`).
    #[test]
    fn every_certificate_passes_strict_x509_verification() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(dir.path()).unwrap();
        let ca = dir.path().join("ca.crt");
        let mut checked = 0;
        for path in written
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        {
            let mut cmd = std::process::Command::new("openssl");
            cmd.args(["verify", "-x509_strict", "-CAfile"]).arg(&ca);
            if path.ends_with("consumer-expired.crt") {
                cmd.arg("-no_check_time");
            }
            let out = cmd.arg(path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
        assert_eq!(checked, 8, "{written:?}");
    }
}
