//! Signals, systemd notification and reload orchestration: SIGHUP re-reads the certificates, keys, CA files and
//! CRLs and re-imports the policy files, putting both in force for what starts next without dropping a connection
//! (refused material keeps the running one and says why);
//! SIGTERM and SIGINT start the graceful stop. Under systemd (`Type=notify`) the service manager hears `READY=1`
//! once the listener is bound, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around each reload,
//! `STOPPING=1` when the stop begins, and watchdog pings when `WatchdogSec` is set. Without `NOTIFY_SOCKET`
//! every notification is a no-op. No request logic.

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

use crate::app::Handles;
use crate::config::{Config, Problems};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::tls::Reloadable;

/// Tells systemd something; a failure to reach it is logged, never fatal.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The listener is bound and the policy loaded: `READY=1`.
pub(crate) fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The graceful stop has begun: `STOPPING=1`.
pub(crate) fn notify_stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining open exchanges"),
    ]);
}

/// Pings the systemd watchdog at half its interval while the runtime is alive, when `WatchdogSec` is set.
pub(crate) async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// Takes over SIGTERM and SIGINT at once, so that from the return on neither kills the process, and gives the
/// future that completes on the first of them. Call it before saying the process is ready (systemd's `READY=1`,
/// the demo's "serving until Ctrl-C"): a signal sent right after that must stop it cleanly, sealing the audit log.
/// Must run inside the runtime.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    if term.is_err() || int.is_err() {
        tracing::error!(
            "cannot listen for SIGTERM or SIGINT: either may end the process without a clean stop"
        );
    }
    async move {
        let recv = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = recv(term.ok()) => {}
            _ = recv(int.ok()) => {}
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

/// Re-reads the certificates, keys, CA files and CRLs and puts them in force for new handshakes (see
/// [`crate::tls::Reloadable`]); bad material is refused whole and the old stays. Counted and logged either way.
pub async fn reload_tls(
    config: &Config,
    tls: &Arc<Reloadable>,
    metrics: &Metrics,
) -> Result<(), Problems> {
    let (server, (config, tls_state)) = (config.server.clone(), (config.clone(), Arc::clone(tls)));
    let result = tokio::task::spawn_blocking(move || {
        tls_state.reload(&config.server, &config.upstream)?;
        Ok::<_, Problems>(crate::app::certificate_expiries(&config))
    })
    .await
    .map_err(|e| Problems::one(format!("TLS reload: {e}")))?;
    metrics.tls_reload(result.is_ok());
    match result {
        Ok(expiries) => {
            metrics.certificates(&expiries);
            metrics.crl_next_updates(&tls.crls().borrow());
            tracing::info!("certificates, keys, CAs and CRLs reloaded");
            crate::tls::log_crl_report(&server);
            Ok(())
        }
        Err(problems) => {
            for line in &problems.problems {
                tracing::error!(problem = %line, "TLS reload refused; the running certificates stay");
            }
            Err(problems)
        }
    }
}

/// Takes over SIGHUP at once (from the return on it no longer ends the process) and gives the task that reloads TLS
/// material and policies on every SIGHUP until the process ends. Call it before saying the process is ready. Must
/// run inside the runtime.
pub(crate) fn reload_on_sighup(
    config: Config,
    handles: Handles,
) -> impl std::future::Future<Output = ()> {
    let hup = signal(SignalKind::hangup());
    if hup.is_err() {
        tracing::error!("cannot listen for SIGHUP: reload is unavailable");
    }
    async move {
        if let Ok(hup) = hup {
            reload_each(hup, config, handles).await;
        }
    }
}

/// The body of [`reload_on_sighup`].
async fn reload_each(mut hup: tokio::signal::unix::Signal, config: Config, handles: Handles) {
    let Handles {
        proxy,
        tls,
        metrics,
        front,
    } = handles;
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
        let _ = reload_tls(&config, &tls, &metrics).await;
        if let Some(front) = &front {
            let front = Arc::clone(front);
            match tokio::task::spawn_blocking(move || front.reload()).await {
                Ok(Ok(())) => {
                    tracing::info!("patient-facing certificate, CAs and practices reloaded")
                }
                Ok(Err(problems)) => {
                    for line in &problems.problems {
                        tracing::error!(problem = %line, "patient-facing reload refused; the running files stay");
                    }
                }
                Err(e) => tracing::error!(error = %e, "patient-facing reload failed"),
            }
        }
        let result = reload_policy(&config, &proxy).await;
        metrics.policy_reload(result.is_ok());
        metrics
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Once `shutdown_signal` has returned, SIGTERM and SIGINT no longer kill the process, even before its future
    /// is first polled (as right after READY=1): each completes the future instead. (Without that, the signal's
    /// default action ends this test's process.)
    #[tokio::test]
    async fn signals_are_taken_over_before_the_future_is_polled() {
        for name in ["TERM", "INT"] {
            let signalled = super::shutdown_signal();
            let sent = std::process::Command::new("sh")
                .args(["-c", &format!("kill -{name} {}", std::process::id())])
                .status()
                .unwrap();
            assert!(sent.success(), "kill -{name}");
            tokio::time::timeout(Duration::from_secs(10), signalled)
                .await
                .unwrap_or_else(|_| panic!("SIG{name} did not complete the future"));
        }
    }
}
