//! Signals, systemd notification and reload orchestration: SIGHUP re-imports the policy files and puts the new
//! generation in force without dropping a connection (a refused reload keeps the running policy and says why);
//! SIGTERM and SIGINT start the graceful stop. Under systemd (`Type=notify`) the service manager hears `READY=1`
//! once the listener is bound, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around each reload,
//! `STOPPING=1` when the stop begins, and watchdog pings when `WatchdogSec` is set. Without `NOTIFY_SOCKET`
//! every notification is a no-op. No request logic.

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{Config, Problems};
use crate::proxy::Proxy;

/// Tells systemd something; a failure to reach it is logged, never fatal.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The listener is bound and the policy loaded: `READY=1`.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The graceful stop has begun: `STOPPING=1`.
pub fn notify_stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining open exchanges"),
    ]);
}

/// Pings the systemd watchdog at half its interval while the runtime is alive, when `WatchdogSec` is set.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

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
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading"),
            ]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
        let result = reload_policy(&config, &proxy).await;
        proxy.metrics().policy_reload(result.is_ok());
        proxy
            .metrics()
            .policy_generation
            .set(proxy.policy().generation as i64);
        notify_ready();
        match result {
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
