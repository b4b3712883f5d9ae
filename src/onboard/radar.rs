//! The consumer credential radar: for every registered consumer ASID, the certificates it presented on
//! connections whose requests passed check 5 (fingerprint, subject, issuer, serial, notAfter, first and last seen,
//! the FQDN that matched), kept across restarts in `<audit.dir>/consumer-certs.json`.
//!
//! Bounded by the directory: only a request that passed checks 5 and 6 (a registered ASID whose FQDN the
//! certificate carries) is noted, at most [`PER_ASID`] certificates are kept per ASID, and ASIDs that leave the
//! directory leave the gauge. A certificate is noted once per connection; a new one is saved at once, and the
//! last-seen times every [`SAVE_EVERY`] and at shutdown (write, fsync, rename), off the workers.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{Asid, PeerIdentity};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// The file, in `audit.dir`.
pub const FILE: &str = "consumer-certs.json";
/// Certificates kept per ASID (the least recently seen goes first): a renewal overlap needs two.
pub const PER_ASID: usize = 8;
/// How often last-seen times are saved and the gauge recomputed.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);
/// FQDN mismatches remembered (so that each is warned of once), across all ASIDs.
const MAX_MISMATCHES: usize = 4096;

/// One certificate an ASID presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub fingerprint_sha256: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub first_seen: i64,
    /// Unix seconds.
    pub last_seen: i64,
    /// The certificate name (CN or DNS SAN) that matched the ASID's registered FQDN.
    pub fqdn: String,
}

/// The file's contents: certificates by ASID.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Inventory {
    pub consumers: BTreeMap<String, Vec<Seen>>,
}

impl Inventory {
    /// Reads `<dir>/consumer-certs.json`; an absent file is an empty inventory.
    ///
    /// # Errors
    ///
    /// The file exists and cannot be read or parsed.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The soonest notAfter per registered ASID, of certificates seen since `since` (Unix seconds).
    pub fn soonest(&self, policy: &Policy, since: i64) -> Vec<(String, i64)> {
        self.consumers
            .iter()
            .filter(|(asid, _)| Asid::parse(asid).is_some_and(|a| policy.system(&a).is_some()))
            .filter_map(|(asid, seen)| {
                seen.iter()
                    .filter(|s| s.last_seen >= since)
                    .map(|s| s.not_after)
                    .min()
                    .map(|t| (asid.clone(), t))
            })
            .collect()
    }
}

/// What noting a certificate found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Noted {
    /// Seen before: its last-seen time moved.
    Again,
    /// First seen for this ASID.
    New {
        /// The issuer of the ASID's previous (most recently seen) certificate, when it differs from this one's.
        issuer_changed_from: Option<String>,
    },
}

/// The running radar.
#[derive(Debug)]
pub struct Radar {
    dir: PathBuf,
    window: Duration,
    state: Mutex<State>,
    /// Wakes the saver at once for a new certificate.
    new: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    inventory: Inventory,
    dirty: bool,
    mismatches: HashSet<(String, String)>,
}

impl Radar {
    /// The radar of `audit_dir`, with what an earlier run kept (a file that cannot be read is logged and started
    /// afresh: the radar is an inventory, not the audit trail).
    pub fn open(audit_dir: &Path, window: Duration) -> Self {
        let inventory = Inventory::load(audit_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "consumer certificate inventory unreadable; starting a new one");
            Inventory::default()
        });
        Self {
            dir: audit_dir.to_path_buf(),
            window,
            state: Mutex::new(State {
                inventory,
                ..State::default()
            }),
            new: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that `asid` presented `peer`'s certificate, matched as `fqdn`, at `now` (Unix seconds); warns and
    /// counts a new certificate from another CA than the ASID's last.
    pub(crate) fn note(
        &self,
        asid: &Asid,
        peer: &PeerIdentity,
        fqdn: &str,
        now: i64,
        metrics: &Metrics,
    ) {
        let noted = {
            let mut state = self.lock();
            state.dirty = true;
            let seen = state
                .inventory
                .consumers
                .entry(asid.as_str().to_owned())
                .or_default();
            if let Some(s) = seen
                .iter_mut()
                .find(|s| s.fingerprint_sha256 == peer.fingerprint_sha256)
            {
                s.last_seen = now;
                Noted::Again
            } else {
                let last_issuer = seen
                    .iter()
                    .max_by_key(|s| s.last_seen)
                    .map(|s| s.issuer.clone());
                seen.push(Seen {
                    fingerprint_sha256: peer.fingerprint_sha256.clone(),
                    subject: peer.subject.clone(),
                    issuer: peer.issuer.clone(),
                    serial: peer.serial.clone(),
                    not_after: peer.not_after,
                    first_seen: now,
                    last_seen: now,
                    fqdn: fqdn.to_owned(),
                });
                if seen.len() > PER_ASID {
                    seen.sort_by_key(|s| std::cmp::Reverse(s.last_seen));
                    seen.truncate(PER_ASID);
                }
                Noted::New {
                    issuer_changed_from: last_issuer.filter(|i| *i != peer.issuer),
                }
            }
        };
        if let Noted::New {
            issuer_changed_from,
        } = noted
        {
            tracing::info!(
                asid = %asid,
                fingerprint_sha256 = %peer.fingerprint_sha256,
                not_after = %crate::clock::rfc3339_seconds(peer.not_after),
                "new consumer certificate"
            );
            if let Some(before) = issuer_changed_from {
                tracing::warn!(
                    asid = %asid,
                    issuer = %peer.issuer,
                    previous_issuer = %before,
                    fingerprint_sha256 = %peer.fingerprint_sha256,
                    "consumer certificate issued by another CA than its last"
                );
                metrics.consumer_cert_warning("issuer_changed");
            }
            self.new.notify_one();
        }
    }

    /// A registered ASID's requests came with a certificate that does not carry its registered FQDN (check 5
    /// refused it): warned and counted once per (ASID, certificate).
    pub(crate) fn fqdn_mismatch(
        &self,
        asid: &Asid,
        peer: &PeerIdentity,
        registered: &str,
        metrics: &Metrics,
    ) {
        {
            let mut state = self.lock();
            if state.mismatches.len() >= MAX_MISMATCHES {
                return;
            }
            if !state
                .mismatches
                .insert((asid.as_str().to_owned(), peer.fingerprint_sha256.clone()))
            {
                return;
            }
        }
        let names = peer.names();
        tracing::warn!(
            asid = %asid,
            registered_fqdn = registered,
            certificate_names = ?names,
            fingerprint_sha256 = %peer.fingerprint_sha256,
            "consumer certificate does not carry the FQDN the directory holds for its ASID"
        );
        metrics.consumer_cert_warning("fqdn_mismatch");
    }

    /// Sets the expiry gauge from the inventory, for the ASIDs `policy` registers, at `now` (Unix seconds).
    pub(crate) fn publish(&self, policy: &Policy, now: i64, metrics: &Metrics) {
        let since = now - self.window.as_secs() as i64;
        let soonest = self.lock().inventory.soonest(policy, since);
        metrics.consumer_cert_expiries(&soonest);
    }

    /// Writes the inventory when it changed: to a temporary file, fsynced, renamed over the old one.
    ///
    /// # Errors
    ///
    /// The file could not be written; the inventory stays marked changed.
    pub(crate) fn save(&self) -> std::io::Result<()> {
        let bytes = {
            let mut state = self.lock();
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            serde_json::to_vec_pretty(&state.inventory).map_err(std::io::Error::other)?
        };
        let written = write_atomically(&self.dir.join(FILE), &bytes);
        if written.is_err() {
            self.lock().dirty = true;
        }
        written
    }

    /// Saves and publishes every [`SAVE_EVERY`], and at once after a new certificate, until the task is dropped.
    pub(crate) async fn run(
        self: std::sync::Arc<Self>,
        policy: impl Fn() -> std::sync::Arc<Policy>,
        metrics: std::sync::Arc<Metrics>,
    ) {
        loop {
            let radar = std::sync::Arc::clone(&self);
            match tokio::task::spawn_blocking(move || radar.save()).await {
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot save the consumer certificate inventory")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the consumer certificate inventory")
                }
                Ok(Ok(())) => {}
            }
            self.publish(&policy(), crate::clock::unix_now(), &metrics);
            tokio::select! {
                () = tokio::time::sleep(SAVE_EVERY) => {}
                () = self.new.notified() => {}
            }
        }
    }
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it and renames it over `path`; a temporary file whose
/// write failed (a full disk) is removed rather than left in the audit folder.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_data()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One line of `ssp certs report`: a registered consumer ASID and one certificate it presented (or none yet).
#[derive(Debug, Clone)]
pub struct Row {
    pub asid: String,
    /// The system's name in the directory.
    pub name: String,
    /// The FQDN the directory registers for it.
    pub registered_fqdn: String,
    pub seen: Option<Seen>,
}

impl Row {
    /// The row as JSON: `asid`, `name`, `registered_fqdn`, and the certificate's fields (`null` when none seen).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "asid": self.asid,
            "name": self.name,
            "registered_fqdn": self.registered_fqdn,
            "certificate": self.seen.as_ref().map(|s| serde_json::json!({
                "fingerprint_sha256": s.fingerprint_sha256,
                "subject": s.subject,
                "issuer": s.issuer,
                "serial": s.serial,
                "not_after": crate::clock::rfc3339_seconds(s.not_after),
                "first_seen": crate::clock::rfc3339_seconds(s.first_seen),
                "last_seen": crate::clock::rfc3339_seconds(s.last_seen),
                "fqdn": s.fqdn,
            })),
        })
    }
}

/// Every registered consumer's certificates, soonest expiry first (ASIDs never seen last); with `within`, only
/// certificates whose notAfter is before `now + within` (expired ones included).
pub fn report(
    inventory: &Inventory,
    policy: &Policy,
    now: i64,
    within: Option<Duration>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for system in policy.systems() {
        let asid = system.asid.as_str();
        let base = Row {
            asid: asid.to_owned(),
            name: system.name.clone(),
            registered_fqdn: system.fqdn.to_string(),
            seen: None,
        };
        match inventory.consumers.get(asid).filter(|s| !s.is_empty()) {
            None if within.is_none() => rows.push(base),
            None => {}
            Some(seen) => {
                for s in seen {
                    if within.is_none_or(|w| s.not_after < now + w.as_secs() as i64) {
                        rows.push(Row {
                            seen: Some(s.clone()),
                            ..base.clone()
                        });
                    }
                }
            }
        }
    }
    rows.sort_by_key(|r| {
        (
            r.seen.as_ref().map_or(i64::MAX, |s| s.not_after),
            r.asid.clone(),
        )
    });
    rows
}

/// The text table of a report.
pub fn table(rows: &[Row], now: i64) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<14} {:<24} {:<21} {:>9}  {:<30} {:<20} {:<20} {}\n",
        "asid", "name", "not_after", "days", "fqdn", "first_seen", "last_seen", "issuer / sha256"
    );
    for r in rows {
        match &r.seen {
            None => {
                let _ = writeln!(
                    out,
                    "{:<14} {:<24} (no certificate seen; registered fqdn {})",
                    r.asid,
                    cut(&r.name, 24),
                    r.registered_fqdn
                );
            }
            Some(s) => {
                let _ = writeln!(
                    out,
                    "{:<14} {:<24} {:<21} {:>9}  {:<30} {:<20} {:<20} {} / {}",
                    r.asid,
                    cut(&r.name, 24),
                    crate::clock::rfc3339_seconds(s.not_after),
                    (s.not_after - now).div_euclid(86_400),
                    s.fqdn,
                    crate::clock::rfc3339_seconds(s.first_seen),
                    crate::clock::rfc3339_seconds(s.last_seen),
                    s.issuer,
                    s.fingerprint_sha256
                );
            }
        }
    }
    out
}

fn cut(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn peer(fingerprint: &str, issuer: &str, not_after: i64) -> PeerIdentity {
        PeerIdentity {
            subject: "CN=consumer.dev.localhost".into(),
            common_name: Some("consumer.dev.localhost".into()),
            dns_sans: vec![],
            serial: "01".into(),
            fingerprint_sha256: fingerprint.into(),
            issuer: issuer.into(),
            not_after,
        }
    }

    fn warnings(metrics: &Metrics, kind: &str) -> bool {
        metrics
            .render()
            .lines()
            .any(|l| l == format!("ssp_consumer_cert_warnings_total{{kind=\"{kind}\"}} 1"))
    }

    /// A new certificate from another CA than the ASID's last is counted; at most `PER_ASID` are kept, the least
    /// recently seen going first; the inventory survives a save and a reopen.
    #[test]
    fn certificates_are_bounded_kept_and_a_new_ca_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        let radar = Radar::open(dir.path(), Duration::from_secs(86_400));
        let asid = Asid::parse("200000000359").unwrap();
        radar.note(
            &asid,
            &peer("aa", "CN=CA 1", 1_000),
            "consumer.dev.localhost",
            10,
            &metrics,
        );
        radar.note(
            &asid,
            &peer("aa", "CN=CA 1", 1_000),
            "consumer.dev.localhost",
            20,
            &metrics,
        );
        assert!(!warnings(&metrics, "issuer_changed"));
        radar.note(
            &asid,
            &peer("bb", "CN=CA 2", 2_000),
            "consumer.dev.localhost",
            30,
            &metrics,
        );
        assert!(warnings(&metrics, "issuer_changed"));
        for i in 0..PER_ASID {
            radar.note(
                &asid,
                &peer(&format!("c{i}"), "CN=CA 2", 3_000),
                "x",
                40 + i as i64,
                &metrics,
            );
        }
        radar.save().unwrap();
        let kept = Inventory::load(dir.path()).unwrap();
        let seen = &kept.consumers["200000000359"];
        assert_eq!(seen.len(), PER_ASID);
        assert!(
            seen.iter().all(|s| s.fingerprint_sha256 != "aa"),
            "the oldest stayed"
        );
        let reopened = Radar::open(dir.path(), Duration::from_secs(86_400));
        assert_eq!(
            reopened.lock().inventory.consumers["200000000359"].len(),
            PER_ASID
        );
    }
}
