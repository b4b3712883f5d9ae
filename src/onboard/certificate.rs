//! Check 1 for `ssp onboard check`: the consumer's chain verified by the consumer listener's own verifier
//! ([`crate::tls::client_verifier`]), and on a refusal the fix in the consumer's terms: the certificate's dates,
//! the issuer missing from the chain, the CRL that revokes it, the key usage it lacks.

use std::path::PathBuf;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use super::{CheckReport, Status};
use crate::ids::PeerIdentity;

/// Seconds in a day, for "expires in N days".
const DAY: i64 = 86_400;
/// A certificate expiring within this many days passes with a warning (the radar's alert rule's first step).
const WARN_DAYS: i64 = 30;

/// What check 1 reads of a certificate: the peer identity the listener reads after a handshake
/// ([`crate::tls::peer_identity`]), and what only the verdict needs.
#[derive(Debug, Clone)]
pub(crate) struct Facts {
    pub peer: PeerIdentity,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// The extended key usages it lists include TLS client authentication (or it lists none).
    pub client_auth: bool,
}

impl Facts {
    pub(crate) fn read(cert: &CertificateDer<'_>) -> Option<Self> {
        let peer = crate::tls::peer_identity(cert)?;
        let (_, x509) = parse_x509_certificate(cert).ok()?;
        let client_auth = match x509.extended_key_usage() {
            Ok(Some(eku)) => eku.value.client_auth || eku.value.any,
            _ => true,
        };
        Some(Self {
            peer,
            not_before: x509.validity().not_before.timestamp(),
            client_auth,
        })
    }
}

/// The fix for a certificate without TLS client authentication among its extended key usages.
const NO_CLIENT_AUTH: &str = "the certificate's extended key usage lacks TLS client authentication (clientAuth, \
                              1.3.6.1.5.5.7.3.2): have it reissued with it";

/// "in N days" / "N days ago" from `now`.
fn days(until: i64, now: i64) -> String {
    let d = (until - now) / DAY;
    if until >= now {
        format!("in {d} days")
    } else {
        format!("{} days ago", -d)
    }
}

/// The trust and revocation material check 1 is verified against.
pub(crate) struct Trust<'a> {
    pub verifier: &'a dyn rustls::server::danger::ClientCertVerifier,
    /// `server.client_ca`'s roots, by subject.
    pub roots: Vec<String>,
    /// `server.crl`'s files.
    pub crls: &'a [PathBuf],
}

/// Check 1 offline: the chain (leaf first) through the listener's verifier at `now` (Unix seconds).
pub(crate) fn check(chain: &[CertificateDer<'static>], trust: &Trust<'_>, now: i64) -> CheckReport {
    let mut report = CheckReport::new(1, "certificate");
    let Some((leaf, intermediates)) = chain.split_first() else {
        report.fail(
            "no certificate given".into(),
            "send the certificate the system will present".into(),
        );
        return report;
    };
    let Some(facts) = Facts::read(leaf) else {
        report.fail(
            "the first certificate cannot be read as X.509".into(),
            "give the consumer's certificate, leaf first, as PEM or PKCS#12".into(),
        );
        return report;
    };
    let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    match trust.verifier.verify_client_cert(leaf, intermediates, when) {
        Ok(_) => {
            report.status = Status::Pass;
            report.detail = format!(
                "{} (serial {}) chains to server.client_ca; valid until {} ({})",
                facts.peer.subject,
                facts.peer.serial,
                crate::clock::rfc3339_seconds(facts.peer.not_after),
                days(facts.peer.not_after, now)
            );
            if facts.peer.not_after - now < WARN_DAYS * DAY {
                report.fixes.push(format!(
                    "warning: the certificate expires {}: have its renewal issued and registered now",
                    days(facts.peer.not_after, now)
                ));
            }
        }
        Err(error) => {
            let reason = crate::tls::certificate_failure_reason(&error);
            report.refusal = Some(super::Refused::Handshake(reason));
            let fix = fix(&error, reason, &facts, chain, trust, now);
            report.fail(
                format!(
                    "{} (serial {}): {reason}",
                    facts.peer.subject, facts.peer.serial
                ),
                fix,
            );
        }
    }
    report.facts = Some(facts);
    report
}

/// The line that says what to change, for a refused chain.
fn fix(
    error: &rustls::Error,
    reason: &str,
    facts: &Facts,
    chain: &[CertificateDer<'static>],
    trust: &Trust<'_>,
    now: i64,
) -> String {
    use rustls::CertificateError as E;
    match reason {
        "certificate_expired" => format!(
            "the certificate expired at {} ({}): renew it",
            crate::clock::rfc3339_seconds(facts.peer.not_after),
            days(facts.peer.not_after, now)
        ),
        "certificate_not_yet_valid" => format!(
            "the certificate is valid only from {} ({}): use it from then, or check the system's clock",
            crate::clock::rfc3339_seconds(facts.not_before),
            days(facts.not_before, now)
        ),
        "certificate_revoked" => match revoked_by(&facts.peer.serial, trust.crls) {
            Some(file) => format!(
                "the certificate (serial {}) is revoked by CRL {file}: have a new one issued",
                facts.peer.serial
            ),
            None => format!(
                "the certificate (serial {}) is revoked: have a new one issued",
                facts.peer.serial
            ),
        },
        "crl_expired" => {
            "the proxy's CRL is past its nextUpdate: the operator must refresh server.crl (not the \
                          consumer's to fix)"
                .into()
        }
        "unknown_issuer" => {
            let last = chain.last().and_then(Facts::read);
            let issuer = last.map_or_else(|| facts.peer.issuer.clone(), |l| l.peer.issuer);
            if trust.roots.contains(&issuer) {
                format!(
                    "the chain does not verify up to {issuer}: check that each certificate is signed by the next"
                )
            } else {
                format!(
                    "the chain lacks the certificate of its issuer {issuer}: send the intermediate(s) after the \
                     leaf; the proxy trusts {}",
                    if trust.roots.is_empty() {
                        "no roots".to_owned()
                    } else {
                        trust.roots.join("; ")
                    }
                )
            }
        }
        _ => match error {
            rustls::Error::InvalidCertificate(E::UnknownRevocationStatus) => format!(
                "no CRL in server.crl is from the certificate's issuer {}, so its revocation status is unknown: the \
                 operator must add that CA's CRL (not the consumer's to fix)",
                facts.peer.issuer
            ),
            rustls::Error::InvalidCertificate(
                E::InvalidPurpose | E::InvalidPurposeContext { .. },
            ) => NO_CLIENT_AUTH.into(),
            _ if !facts.client_auth => NO_CLIENT_AUTH.into(),
            e => format!("the certificate is refused: {e}"),
        },
    }
}

/// The CRL file of `crls` that lists `serial` (lower-case hex), by its file name.
fn revoked_by(serial: &str, crls: &[PathBuf]) -> Option<String> {
    for path in crls {
        let Ok(list) = crate::tls::load_crls("server.crl", std::slice::from_ref(path)) else {
            continue;
        };
        for der in &list {
            let Ok((_, crl)) = parse_x509_crl(der) else {
                continue;
            };
            if crl
                .iter_revoked_certificates()
                .any(|r| crate::hex::hex(r.raw_serial()) == serial)
            {
                return Some(path.display().to_string());
            }
        }
    }
    None
}
