//! Assembling a proxy from a validated [`Config`]: TLS material for both legs and the policy, all loaded and
//! checked before anything binds, every problem reported at once. `serve`, `check-config`, `demo` and the
//! integration tests all start here, so they cannot drift apart.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
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

mod inspect;

pub(crate) use inspect::{certificate_expiries, certificate_files, inspect};

/// Everything loaded from disk, validated, not yet bound.
#[derive(Debug)]
pub struct Assembled {
    pub server_tls: Arc<rustls::ServerConfig>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub policy: Arc<Policy>,
    /// `[patient_facing]`, its files read.
    pub front: Option<Arc<crate::patient_facing::Front>>,
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
    let front = config.patient_facing.as_ref().and_then(|pf| {
        crate::patient_facing::Front::load(pf, &config.upstream)
            .map_err(|p| problems.extend(p.problems))
            .ok()
    });
    match (server_tls, client_tls, policy) {
        (Some(server_tls), Some(client_tls), Some(policy)) if problems.is_empty() => {
            Ok(Assembled {
                server_tls,
                client_tls,
                policy: Arc::new(policy),
                front: front.map(Arc::new),
            })
        }
        _ => Err(Problems { problems }),
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
    /// The patient-facing listener's TLS and practices, reloaded with the rest.
    pub front: Option<Arc<crate::patient_facing::Front>>,
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

    /// The patient-facing listener's address, with `[patient_facing]`.
    pub fn patient_facing_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.server.patient_facing_addr()
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
            handoffs: metrics.audit_writer_handoffs.clone(),
            on_thread: metrics.audit_writes_on_thread.clone(),
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
    let proxy = match patients {
        Some(indexer) => proxy.with_patients(indexer),
        None => proxy,
    };
    let proxy = Arc::new(match &assembled.front {
        Some(front) => {
            front.connect_upstream(Arc::clone(&tls));
            front.start().await;
            proxy.with_patient_facing(Arc::clone(front))
        }
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
    let mut server = Server::bind(
        &config.server,
        &config.limits,
        Arc::clone(&tls),
        Arc::clone(&proxy),
        Arc::clone(&metrics),
        Arc::clone(&serving),
    )
    .await
    .map_err(listen_error)?;
    if let Some(front) = &assembled.front {
        let listen = front.config().listen;
        server
            .bind_patient_facing(Arc::clone(front))
            .await
            .map_err(|e| {
                let why = format!("patient_facing.listen: cannot listen on {listen}: {e}");
                std::io::Error::new(e.kind(), why)
            })?;
    }
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
            front: assembled.front,
        },
        audit,
        radar,
        lookups,
        shipper,
    })
}
