//! Assembling a proxy from a validated [`Config`]: TLS material for both legs and the policy, all loaded and
//! checked before anything binds, every problem reported at once. `serve`, `check-config`, `demo` and the
//! integration tests all start here, so they cannot drift apart.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{Config, Problems};
use crate::forward::Upstream;
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

/// Everything `check-config` checks, without side effects (the policy store is not written): certificates,
/// keys, CRLs, policy files, the audit folder. One line per problem.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(p) = tls::server_config(&config.server) {
        problems.extend(p.problems);
    }
    if let Err(p) = tls::client_config(&config.upstream) {
        problems.extend(p.problems);
    }
    if let Err(p) = Policy::load_dir(&config.policy.dir, 0) {
        problems.extend(p.problems);
    }
    problems.extend(audit_dir_problem(config));
    problems
}

/// Reads and validates the policy files and, when they differ from the store's current generation, imports them
/// as a new generation. A broken set of files is refused whole and nothing is written. Blocking (sled, files).
pub fn import_policy(config: &Config) -> Result<(Policy, bool), Problems> {
    let source = Source::read_dir(&config.policy.dir)?;
    let mut policy = Policy::compile(&source, 0)?;
    let store = Store::open(&config.policy.store).map_err(Problems::one)?;
    let (generation, new) = store
        .import(source, config.policy.keep_generations)
        .map_err(Problems::one)?;
    policy.generation = generation.number;
    Ok((policy, new))
}

/// The policy to start on: the files, imported (see [`import_policy`]); when they are broken, the store's current
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
pub fn expiry_report(config: &Config) -> (Vec<String>, Vec<String>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut expired = Vec::new();
    let mut soon = Vec::new();
    let files = [
        ("server.cert", &config.server.cert),
        ("upstream.cert", &config.upstream.cert),
    ]
    .into_iter()
    .chain(
        config
            .server
            .client_ca
            .iter()
            .map(|p| ("server.client_ca", p)),
    )
    .chain(config.upstream.ca.iter().map(|p| ("upstream.ca", p)));
    for (key, path) in files {
        let Ok(certs) = tls::load_certs(key, path) else {
            continue;
        };
        for not_after in certs.iter().filter_map(tls::not_after) {
            if not_after < now {
                expired.push(format!("{key}: {}: certificate expired", path.display()));
            } else if not_after < now + 30 * 86_400 {
                soon.push(format!(
                    "{key}: {}: certificate expires in {} days",
                    path.display(),
                    (not_after - now) / 86_400
                ));
            }
        }
    }
    (expired, soon)
}

/// Whether `audit.dir` is, or can become, a folder (it is created on start when missing).
pub fn audit_dir_problem(config: &Config) -> Option<String> {
    let dir = &config.audit.dir;
    let mut existing = dir.as_path();
    while !existing.exists() {
        existing = existing.parent()?;
    }
    (!existing.is_dir()).then(|| {
        format!(
            "audit.dir: {}: {} is not a folder",
            dir.display(),
            existing.display()
        )
    })
}

/// `notAfter` of each certificate the config names, labelled as `ssp_certificate_expiry_timestamp_seconds` is:
/// `server`, `upstream_client`, `client_ca:<file>`, `upstream_ca:<file>`.
pub fn certificate_expiries(config: &Config) -> Vec<(String, i64)> {
    let file = |p: &std::path::Path| {
        p.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    let mut named: Vec<(String, &std::path::Path)> = vec![
        ("server".into(), config.server.cert.as_path()),
        ("upstream_client".into(), config.upstream.cert.as_path()),
    ];
    named.extend(
        config
            .server
            .client_ca
            .iter()
            .map(|p| (format!("client_ca:{}", file(p)), p.as_path())),
    );
    named.extend(
        config
            .upstream
            .ca
            .iter()
            .map(|p| (format!("upstream_ca:{}", file(p)), p.as_path())),
    );
    named
        .into_iter()
        .filter_map(|(name, path)| {
            let certs = tls::load_certs("cert", path).ok()?;
            Some((name, tls::not_after(certs.first()?)?))
        })
        .collect()
}

/// Builds the pipeline (metrics, audit writer, upstream client) and binds the consumer and admin listeners.
pub async fn bind(config: &Config, assembled: Assembled) -> std::io::Result<Server> {
    let metrics = Arc::new(crate::metrics::Metrics::new().map_err(std::io::Error::other)?);
    metrics
        .policy_generation
        .set(assembled.policy.generation as i64);
    metrics.certificates(&certificate_expiries(config));
    let audit = crate::audit::AuditLog::start_with_metrics(
        config.audit.clone(),
        Some(crate::audit::AuditMetrics {
            records: metrics.audit_records.clone(),
            write_seconds: metrics.audit_write_seconds.clone(),
        }),
    );
    let tls = Arc::new(tls::Reloadable::new(
        assembled.server_tls,
        assembled.client_tls,
    ));
    let upstream = Upstream::new(&config.upstream, Arc::clone(&tls));
    let proxy = Arc::new(Proxy::new(
        config.server.methods.clone(),
        assembled.policy,
        &config.jwt,
        upstream,
        audit,
        metrics,
    ));
    Server::bind(&config.server, tls, proxy, config.admin_listen).await
}
