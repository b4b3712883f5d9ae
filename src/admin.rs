//! The admin listener (`admin.listen`, plain HTTP, loopback by default, never the consumer port): `/metrics` in
//! Prometheus text format, `/healthz` (200 while the process runs) and `/readyz` (200 only while the consumer
//! listener is serving, a policy generation is loaded and the audit writer can write).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::audit::AuditLog;
use crate::metrics::Metrics;

/// What `/readyz` looks at.
#[derive(Debug)]
pub(crate) struct Health {
    /// Set while the consumer listener accepts connections.
    pub serving: Arc<AtomicBool>,
    pub audit: Arc<AuditLog>,
}

/// Serves the admin endpoints until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin, as the consumer listener does.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (metrics, health) = (Arc::clone(&metrics), Arc::clone(&health));
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = answer(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn answer(req: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            metrics
                .audit_queue_depth
                .set(health.audit.queue_depth() as i64);
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let mut problems = Vec::new();
            if !health.serving.load(Ordering::Acquire) {
                problems.push("consumer listener not serving");
            }
            if !health.audit.healthy() {
                problems.push("audit log not writable");
            }
            if health.audit.stalled() {
                problems.push("audit log write stalled (not returned for over 1 s)");
            }
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", problems.join("; ")),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "/metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Accepts `ssp audit subject`'s connections on the lookup socket (`audit::patients::lookup`) until the task is
/// aborted, each answered on its own task.
pub(crate) async fn serve_lookups(listener: Arc<tokio::net::UnixListener>, audit: Arc<AuditLog>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "lookup socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let audit = Arc::clone(&audit);
        tokio::spawn(async move { crate::audit::patients::lookup::answer(stream, &audit).await });
    }
}
