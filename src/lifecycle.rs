//! Signals and reload orchestration: SIGHUP re-imports the policy files and puts the new generation in force
//! without dropping a connection (a refused reload keeps the running policy and says why); SIGTERM and SIGINT
//! start the graceful stop. No request logic.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, Problems};
use crate::proxy::Proxy;

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Re-imports the policy files and, if they are valid, swaps the proxy's snapshot. Requests already decided keep
/// the generation that decided them. Returns the generation now in force and whether it is new.
pub async fn reload_policy(config: &Config, proxy: &Proxy) -> Result<(u64, bool), Problems> {
    let config = config.clone();
    let imported = tokio::task::spawn_blocking(move || crate::app::import_policy(&config))
        .await
        .map_err(|e| Problems::one(format!("policy reload: {e}")))??;
    let (policy, new) = imported;
    let generation = policy.generation;
    // Also when the files match the store but the proxy runs another generation (an import from elsewhere).
    let changed = generation != proxy.policy().generation;
    if changed {
        proxy.set_policy(Arc::new(policy));
    }
    Ok((generation, new || changed))
}

/// Reloads on every SIGHUP until the process ends.
pub async fn reload_on_sighup(config: Config, proxy: Arc<Proxy>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP: reload is unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading policies");
        match reload_policy(&config, &proxy).await {
            Ok((generation, true)) => {
                tracing::info!(generation, "policy reloaded: new generation in force")
            }
            Ok((generation, false)) => tracing::info!(generation, "policy files unchanged"),
            Err(problems) => {
                for line in &problems.problems {
                    tracing::error!(problem = %line, "policy reload refused; the running policy stays");
                }
            }
        }
    }
}
