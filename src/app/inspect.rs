//! What `check-config` inspects beyond the config file itself, without side effects: the certificates, keys and
//! CRLs both legs and the patient-facing listener name and their expiry, the policy files, and the state folders
//! the service writes.

use std::path::{Path, PathBuf};

use crate::audit::patients::PatientKey;
use crate::config::Config;
use crate::policy::Policy;
use crate::tls;

/// What `check-config` found.
#[derive(Debug)]
pub(crate) struct Inspection {
    /// One line each; any makes the config unusable.
    pub problems: Vec<String>,
    /// Worth saying, not fatal (a certificate expiring within 30 days).
    pub warnings: Vec<String>,
    /// The compiled policy files, when they are valid.
    pub policy: Option<Policy>,
}

/// Everything `check-config` checks, without side effects (the policy store is not written): certificates, keys,
/// CRLs and their expiry, policy files, the audit folder.
pub(crate) fn inspect(config: &Config) -> Inspection {
    let mut problems = Vec::new();
    if let Err(p) = tls::server_config(&config.server) {
        problems.extend(p.problems);
    }
    if let Err(p) = tls::client_config(&config.upstream) {
        problems.extend(p.problems);
    }
    let policy = Policy::load_dir(&config.policy.dir, 0)
        .map_err(|p| problems.extend(p.problems))
        .ok();
    problems.extend(state_dir_problems(config));
    if let Some(patients) = &config.patients
        && let Err(why) = PatientKey::load(&patients.key)
    {
        problems.push(format!("audit.patients.key: {why}"));
    }
    if let Some(ship) = &config.ship {
        problems.extend(crate::audit::ship::check(ship));
    }
    let mut door_warnings = Vec::new();
    if let Some(pf) = &config.patient_facing {
        if let Err(p) = crate::patient_facing::Front::load(pf, &config.upstream) {
            problems.extend(p.problems);
        }
        door_warnings = crate::patient_facing::Front::warnings(pf);
        // A refused `asid` stands as the placeholder 0, already said.
        if let Some(policy) = policy
            .as_ref()
            .filter(|_| pf.asid != crate::ids::Asid::placeholder())
        {
            match policy.system(&pf.asid) {
                None => problems.push(format!(
                    "patient_facing.asid: {} is not a [[system]] in {}: every patient-facing request would be \
                     refused ACCESS_DENIED",
                    pf.asid,
                    config.policy.dir.display()
                )),
                Some(system) => door_warnings.extend(
                    pf.routes
                        .iter()
                        .filter(|r| !system.interactions.contains(&r.interaction))
                        .map(|r| {
                            format!(
                                "patient_facing.route {}: {} is not among the interactions of [[system]] {}: \
                                 its requests would be refused ACCESS_DENIED",
                                r.path, r.interaction, pf.asid
                            )
                        }),
                ),
            }
        }
    }
    let (expired, mut warnings) = expiry_report(config);
    warnings.extend(door_warnings);
    problems.extend(expired);
    let crls = tls::crl_report(&config.server, crate::clock::unix_now());
    problems.extend(crls.refused);
    warnings.extend(crls.trusted_stale);
    warnings.extend(crls.expiring);
    Inspection {
        problems,
        warnings,
        policy,
    }
}

/// Certificates named by the config that have expired (a problem) or expire within 30 days (a warning).
pub(crate) fn expiry_report(config: &Config) -> (Vec<String>, Vec<String>) {
    let now = crate::clock::unix_now();
    let mut expired = Vec::new();
    let mut soon = Vec::new();
    for cert in certificate_files(config) {
        if cert.not_after < now {
            expired.push(format!(
                "{}: {}: certificate expired (notAfter {})",
                cert.key,
                cert.path.display(),
                crate::clock::rfc3339_seconds(cert.not_after)
            ));
        } else if cert.not_before > now {
            expired.push(format!(
                "{}: {}: certificate not yet valid (notBefore {})",
                cert.key,
                cert.path.display(),
                crate::clock::rfc3339_seconds(cert.not_before)
            ));
        } else if cert.not_after < now + 30 * 86_400 {
            soon.push(format!(
                "{}: {}: certificate expires in {} days",
                cert.key,
                cert.path.display(),
                (cert.not_after - now) / 86_400
            ));
        }
    }
    (expired, soon)
}

/// Whether each folder the service writes (`audit.dir`, `policy.store`) is, or can become, a folder that the
/// running user can write: where it exists, a probe file is created and removed in it; where it does not, its
/// nearest existing ancestor must be a folder the user may create entries in (`access(2)` with `W_OK | X_OK`,
/// through rustix). Run by `check-config` as the service's own user, this finds at `ExecStartPre` what would
/// otherwise fail after start. One line per folder: the key, the path and the OS error.
pub(crate) fn state_dir_problems(config: &Config) -> Vec<String> {
    [
        ("audit.dir", config.audit.dir.as_path()),
        ("policy.store", config.policy.store.as_path()),
    ]
    .into_iter()
    .filter_map(|(key, dir)| {
        writable_dir(dir)
            .err()
            .map(|why| format!("{key}: {}: {why}", dir.display()))
    })
    .collect()
}

/// `Ok` when `dir` is, or can be created as, a folder the running user can write; else why not.
fn writable_dir(dir: &Path) -> Result<(), String> {
    let mut existing = dir;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
    }
    if !existing.is_dir() {
        return Err(format!("{} is not a folder", existing.display()));
    }
    if existing != dir {
        use rustix::fs::Access;
        return rustix::fs::access(existing, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
            format!(
                "cannot be created in {}: {}",
                existing.display(),
                std::io::Error::from(e)
            )
        });
    }
    let probe = dir.join(format!(".ssp-write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot write in it: {e}"))?;
    std::fs::remove_file(&probe).map_err(|e| format!("cannot remove a file in it: {e}"))?;
    files_writable(dir, 2)
}

/// Every regular file under `dir` (to `depth` folders down, at most 10,000 entries) opens for reading and writing
/// without being changed: a segment or store file left by a run as another user (root) would stop the service.
fn files_writable(dir: &Path, depth: u32) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list it: {e}"))?;
    for entry in entries.take(10_000).flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_file() => {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| format!("{} cannot be opened for writing: {e}", path.display()))?;
            }
            Ok(kind) if kind.is_dir() && depth > 0 => files_writable(&path, depth - 1)?,
            _ => {}
        }
    }
    Ok(())
}

/// A certificate file the config names.
#[derive(Debug, Clone)]
pub(crate) struct CertificateFile {
    /// The config key that names it (`server.cert`, `upstream.ca`, ...).
    pub key: &'static str,
    /// Its `cert` label in `ssp_certificate_expiry_timestamp_seconds`: `server`, `upstream_client`,
    /// `client_ca:<file>`, `upstream_ca:<file>`.
    pub label: String,
    pub path: PathBuf,
    /// The earliest `notAfter` of the certificates in it (Unix seconds): when the file stops being usable.
    pub not_after: i64,
    /// The latest `notBefore` of the certificates in it (Unix seconds): when the file starts being usable.
    pub not_before: i64,
}

/// Every certificate file the config names that can be read, with its earliest `notAfter`.
pub(crate) fn certificate_files(config: &Config) -> Vec<CertificateFile> {
    let file = |p: &Path| {
        p.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    let mut named: Vec<(&'static str, String, &Path)> = vec![
        ("server.cert", "server".into(), config.server.cert.as_path()),
        (
            "upstream.cert",
            "upstream_client".into(),
            config.upstream.cert.as_path(),
        ),
    ];
    named.extend(config.server.client_ca.iter().map(|p| {
        (
            "server.client_ca",
            format!("client_ca:{}", file(p)),
            p.as_path(),
        )
    }));
    named.extend(config.upstream.ca.iter().map(|p| {
        (
            "upstream.ca",
            format!("upstream_ca:{}", file(p)),
            p.as_path(),
        )
    }));
    named
        .into_iter()
        .filter_map(|(key, label, path)| {
            let certs = tls::load_certs(key, path).ok()?;
            let not_after = certs.iter().filter_map(tls::not_after).min()?;
            let not_before = certs.iter().filter_map(tls::not_before).max()?;
            Some(CertificateFile {
                key,
                label,
                path: path.to_path_buf(),
                not_after,
                not_before,
            })
        })
        .collect()
}

/// `(label, notAfter)` for `ssp_certificate_expiry_timestamp_seconds`.
pub(crate) fn certificate_expiries(config: &Config) -> Vec<(String, i64)> {
    certificate_files(config)
        .into_iter()
        .map(|c| (c.label, c.not_after))
        .collect()
}
