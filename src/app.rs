//! Assembling a proxy from a validated [`Config`]: TLS material for both legs and the policy, all loaded and
//! checked before anything binds, every problem reported at once. `serve`, `check-config`, `demo` and the
//! integration tests all start here, so they cannot drift apart.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::audit::AuditLog;
use crate::audit::patients::{Indexer, PatientKey};
use crate::config::{Config, Problems};
use crate::forward::Upstream;
use crate::metrics::Metrics;
use crate::policy::store::Store;
use crate::policy::{Policy, Source};
use crate::proxy::Proxy;
use crate::server::Server;
use crate::tls;

/// Everything loaded from disk, validated, not yet bound.
#[derive(Debug)]
pub struct Assembled {
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub policy: Arc<Policy>,
}

/// Loads certificates, keys and CRLs named by `config`, and the policy to start on (see [`start_policy`]);
/// collects every problem.
pub fn assemble(config: &Config) -> Result<Assembled, Problems> {
    let mut problems = Vec::new();
    let server_tls = tls::server_config(&config.server)
        .map_err(|p| problems.extend(p.problems))
        .ok();
    let client_tls = tls::client_config(&config.upstream)
        .map_err(|p| problems.extend(p.problems))
        .ok();
    let policy = start_policy(config)
        .map_err(|p| problems.extend(p.problems))
        .ok();
    match (server_tls, client_tls, policy) {
        (Some(server_tls), Some(client_tls), Some(policy)) if problems.is_empty() => {
            Ok(Assembled {
                server_tls,
                client_tls,
                policy: Arc::new(policy),
            })
        }
        _ => Err(Problems { problems }),
    }
}

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
    let (expired, mut warnings) = expiry_report(config);
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

/// Reads and validates the policy files and, when they differ from the store's current generation, imports them
/// as a new generation. A broken set of files is refused whole and nothing is written. Blocking (sled, files).
pub(crate) fn import_policy(config: &Config) -> Result<(Policy, bool), Problems> {
    let source = Source::read_dir(&config.policy.dir)?;
    let mut policy = Policy::compile(&source, 0)?;
    let store = Store::open(&config.policy.store).map_err(Problems::one)?;
    let (generation, new) = store
        .import(source, config.policy.keep_generations)
        .map_err(Problems::one)?;
    policy.generation = generation.number;
    Ok((policy, new))
}

/// The policy to start on: the files, imported (see `import_policy`); when they are broken, the store's current
/// generation, the last good one, with a warning naming every problem. Fails only when there is neither.
pub fn start_policy(config: &Config) -> Result<Policy, Problems> {
    let mut problems = match import_policy(config) {
        Ok((policy, _)) => return Ok(policy),
        Err(problems) => problems,
    };
    let stored = Store::open(&config.policy.store).and_then(|store| store.current());
    match stored {
        Ok(Some(generation)) => {
            for line in &problems.problems {
                tracing::warn!(problem = %line, "policy files refused");
            }
            tracing::warn!(
                generation = generation.number,
                "starting on the last good policy generation"
            );
            Policy::compile(&generation.source, generation.number)
        }
        Ok(None) => {
            problems.problems.push(format!(
                "{}: no earlier good generation to start on",
                config.policy.store.display()
            ));
            Err(problems)
        }
        Err(e) => {
            problems.problems.push(e);
            Err(problems)
        }
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

/// A wired instance, ready to run: the consumer listener, the admin listener, and the shared parts the two, the
/// reloads and the shutdown use. Everything is connected here and nowhere else.
pub struct Instance {
    server: Server,
    admin: tokio::net::TcpListener,
    health: Arc<crate::admin::Health>,
    handles: Handles,
    audit: Arc<AuditLog>,
    radar: Arc<crate::onboard::radar::Radar>,
    /// `[audit.patients]`: the socket `ssp audit subject` asks the proxy to record its lookups on.
    lookups: Option<Arc<tokio::net::UnixListener>>,
    /// `[audit.ship]`: the thread that ships the log to the collector.
    shipper: Option<crate::audit::ship::Shipper>,
}

/// What a reload touches: the policy snapshot (in the proxy), the TLS material, and their metrics.
#[derive(Debug, Clone)]
pub struct Handles {
    pub proxy: Arc<Proxy>,
    pub tls: Arc<tls::Reloadable>,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("server", &self.server)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// The consumer listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The parts reloads use.
    pub fn handles(&self) -> Handles {
        self.handles.clone()
    }

    /// Serves consumer connections on the calling runtime instead of on `server.workers` threads of their own:
    /// for tests that pause and advance tokio's clock, which is per runtime.
    pub fn on_caller_runtime(mut self) -> Self {
        self.server.on_caller_runtime();
        self
    }

    /// Serves the admin listener as its own task and the consumer listener (on `server.workers` threads, see
    /// docs/architecture.md, "Workers") until `shutdown` completes; then drains for up to `grace`, stops the admin listener, and
    /// closes the audit log (the current segment sealed and fsynced, off the runtime's workers). Fails when a
    /// worker thread cannot be started; the audit log is closed then too.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> std::io::Result<()> {
        let admin = tokio::spawn(crate::admin::serve(
            self.admin,
            Arc::clone(&self.handles.metrics),
            self.health,
        ));
        let lookups = self.lookups.map(|listener| {
            let task = tokio::spawn(crate::admin::serve_lookups(
                Arc::clone(&listener),
                Arc::clone(&self.audit),
            ));
            (listener, task)
        });
        let served = self.server.run(shutdown, grace).await;
        admin.abort();
        // The lookup socket stays bound (nothing accepted) until the log is closed: a command that connects now
        // waits and fails rather than finding no proxy and writing to the chain beside this one.
        if let Some((_, task)) = &lookups {
            task.abort();
        }
        let radar = self.radar;
        match tokio::task::spawn_blocking(move || radar.save()).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!("cannot save the consumer certificate inventory"),
        }
        let audit = self.audit;
        if tokio::task::spawn_blocking(move || audit.close())
            .await
            .is_err()
        {
            tracing::error!("closing the audit log failed");
        }
        if let Some((listener, _)) = lookups
            && let Ok(addr) = listener.local_addr()
            && let Some(path) = addr.as_pathname()
        {
            let _ = std::fs::remove_file(path);
        }
        // The closed log's last records (its seal) go to the collector too, when it answers within the bound;
        // else they wait on disk for the next start.
        if let Some(shipper) = self.shipper {
            let _ = tokio::task::spawn_blocking(move || shipper.finish(SHIP_AT_STOP)).await;
        }
        served
    }
}

/// The transaction log could not be opened at start: a problem of the state folder `audit.dir` (its owner or
/// mode, a file in it left by another user, a full disk), which `ssp serve` reports with exit 64 like a bad config.
#[derive(Debug)]
pub struct AuditUnopenable(pub PathBuf);

impl std::fmt::Display for AuditUnopenable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "audit.dir: {}: cannot open the transaction log (the reason is logged above)",
            self.0.display()
        )
    }
}

impl std::error::Error for AuditUnopenable {}

/// How long a stopping proxy goes on shipping what its log holds.
const SHIP_AT_STOP: Duration = Duration::from_secs(5);

/// `[audit.ship]` cannot be used at start (its head key or TLS files): reported by `ssp serve` with exit 64,
/// like a bad config.
#[derive(Debug)]
pub struct ShipUnusable(pub String);

impl std::fmt::Display for ShipUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShipUnusable {}

/// `[audit.patients]` cannot be used at start (its key file, or the lookup socket in `audit.dir`): reported by
/// `ssp serve` with exit 64, like a bad config.
#[derive(Debug)]
pub struct PatientIndexUnusable(pub String);

impl std::fmt::Display for PatientIndexUnusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatientIndexUnusable {}

/// Builds the pipeline (metrics, audit writer, upstream client) and binds the consumer and admin listeners. Fails
/// on a listener's socket, or with [`AuditUnopenable`] inside the `io::Error`.
pub async fn bind(config: &Config, assembled: Assembled) -> std::io::Result<Instance> {
    let metrics = Arc::new(Metrics::new().map_err(std::io::Error::other)?);
    metrics
        .policy_generation
        .set(assembled.policy.generation as i64);
    metrics.certificates(&certificate_expiries(config));
    let crls = tls::crl_files(&config.server);
    metrics.crl_next_updates(&crls);
    tls::log_crl_report(&config.server);
    // Starting the log recovers the folder and opens a segment: file I/O, so not on a runtime worker.
    let (audit_config, audit_metrics) = (
        config.audit.clone(),
        crate::audit::AuditMetrics {
            records: metrics.audit_records.clone(),
            write_seconds: metrics.audit_write_seconds.clone(),
        },
    );
    let audit = tokio::task::spawn_blocking(move || {
        AuditLog::start_with_metrics(audit_config, Some(audit_metrics))
    })
    .await
    .map_err(std::io::Error::other)?;
    // A log that cannot be opened at start is a start failure, before systemd hears READY=1; one that fails
    // later turns the proxy away with 503 AUDIT_UNAVAILABLE until it recovers.
    if !audit.healthy() {
        return Err(std::io::Error::other(AuditUnopenable(
            config.audit.dir.clone(),
        )));
    }
    let (patients, lookups) = match &config.patients {
        Some(patients) => {
            let unusable = |why: String| std::io::Error::other(PatientIndexUnusable(why));
            let key = PatientKey::load(&patients.key)
                .map_err(|why| unusable(format!("audit.patients.key: {why}")))?;
            let listener = crate::audit::patients::lookup::bind(&config.audit.dir)
                .map_err(|e| unusable(format!("audit.dir: the lookup socket: {e}")))?;
            (Some(Indexer::new(key, patients)), Some(Arc::new(listener)))
        }
        None => (None, None),
    };
    let shipper = match &config.ship {
        Some(ship) => Some(
            crate::audit::ship::start(ship, &config.audit, metrics.ship.clone())
                .map_err(|why| std::io::Error::other(ShipUnusable(why)))?,
        ),
        None => None,
    };
    let radar = {
        let (dir, window) = (config.audit.dir.clone(), config.radar_window);
        let opened =
            tokio::task::spawn_blocking(move || crate::onboard::radar::Radar::open(&dir, window));
        Arc::new(opened.await.map_err(std::io::Error::other)?)
    };
    let tls = Arc::new(tls::Reloadable::new(
        assembled.server_tls,
        assembled.client_tls,
        crls,
    ));
    tokio::spawn(tls::watch_crl_expiry(tls.crls(), config.server.crl_expired));
    let upstream = Upstream::new(
        &config.upstream,
        config.limits.per_provider_connections,
        Arc::clone(&tls),
    );
    tokio::spawn(upstream.clone().sweep_idle());
    let proxy = Proxy::new(
        config.server.methods.clone(),
        assembled.policy,
        &config.jwt,
        upstream,
        crate::limits::Limits::new(config.limits),
        Arc::clone(&audit),
        Arc::clone(&metrics),
    )
    .with_onboarding(Arc::new(crate::onboard::selftest::Live {
        selftest: config.server.selftest,
        radar: Arc::clone(&radar),
        metrics: Arc::clone(&metrics),
    }));
    let proxy = Arc::new(match patients {
        Some(indexer) => proxy.with_patients(indexer),
        None => proxy,
    });
    {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(Arc::clone(&radar).run(move || proxy.policy(), Arc::clone(&metrics)));
    }
    let serving = Arc::new(AtomicBool::new(false));
    let listen_error = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!(
                "server.listen: cannot listen on {}: {e}",
                config.server.listen
            ),
        )
    };
    let server = Server::bind(
        &config.server,
        &config.limits,
        Arc::clone(&tls),
        Arc::clone(&proxy),
        Arc::clone(&metrics),
        Arc::clone(&serving),
    )
    .await
    .map_err(listen_error)?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "admin.listen: cannot listen on {}: {e}",
                    config.admin_listen
                ),
            )
        })?;
    let health = Arc::new(crate::admin::Health {
        serving,
        audit: Arc::clone(&audit),
    });
    Ok(Instance {
        server,
        admin,
        health,
        handles: Handles {
            proxy,
            tls,
            metrics,
        },
        audit,
        radar,
        lookups,
        shipper,
    })
}
