//! The consumer-facing listener: accept loop, connection limit, TLS handshake with its timeout, the peer identity
//! read once per connection, HTTP/1.1 and HTTP/2 (by ALPN) with hyper's header-read timeout, the idle rule, a
//! graceful drain on shutdown, and the staged close of every connection ssp ends (RFC 9112 section 9.6). Knows
//! nothing of request contents: each request goes to [`Proxy::handle`].
//!
//! The idle rule: a connection with no request in flight (from the end of the handshake, and from the end of each
//! response) is shut down once it has been idle for `server.header_read_timeout` (HTTP/1.1, or before the protocol
//! is known) or `server.http2_idle_timeout` (HTTP/2: GOAWAY, then close), whatever it sends or does not send.

//!
//! - `connection`: one accepted connection: PROXY header, handshake, serving, and how it ends.
//! - `idle`: the idle rule's bookkeeping: requests in flight and since when there have been none.
//! - `close`: the staged close of a connection ssp ends (RFC 9112 section 9.6).

mod close;
mod connection;
mod idle;

use close::CLOSE_GRACE;
use connection::Connection;
use idle::IdleTimeouts;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::proxy::Proxy;

/// A bound consumer listener, ready to run.
pub(crate) struct Server {
    listener: TcpListener,
    /// Read once per accepted connection, so a reload applies to every new handshake.
    tls: Arc<crate::tls::Reloadable>,
    proxy: Arc<Proxy>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    /// The idle rule's bounds: HTTP/1.1 (and before the protocol is known), HTTP/2.
    idle: IdleTimeouts,
    /// Balancers whose connections start with a PROXY protocol header (`server.proxy_protocol_from`).
    proxy_protocol_from: Arc<[ipnet::IpNet]>,
    /// Bounds concurrent connections; when exhausted, further connections wait in the kernel's backlog.
    connections: Arc<Semaphore>,
    next_conn_id: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// True while the listener accepts connections (`/readyz` reads it).
    serving: Arc<AtomicBool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listener, whose connections' requests go to `proxy`; `serving` is set while it accepts. Fails
    /// only on the socket.
    pub(crate) async fn bind(
        cfg: &ServerConfig,
        limits: &crate::config::LimitsConfig,
        tls: Arc<crate::tls::Reloadable>,
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        serving: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            // hyper's timeouts do nothing (or panic) without a timer.
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .keep_alive(true)
            .preserve_header_case(true)
            // hyper's own limits sit above ours, so that a request just over ours reaches the proxy and gets a
            // documented 431 with its audit records; beyond hyper's, hyper answers a bare 431 and closes.
            .max_headers(limits.max_header_count * 2)
            // At most the limit plus room for the request line and separators: with the default limit this stays
            // under the 128 KiB after which some clients (curl) stop sending a head and wait, which would leave
            // them waiting for header_read_timeout instead of getting their 431.
            .max_buf_size((limits.max_header_bytes + 16 * 1024).max(8192));
        http.http2().timer(TokioTimer::new()).max_header_list_size(
            u32::try_from(limits.max_header_bytes * 2 + 16 * 1024).unwrap_or(u32::MAX),
        );
        Ok(Self {
            listener,
            tls,
            proxy,
            http,
            handshake_timeout: cfg.handshake_timeout,
            idle: IdleTimeouts {
                http1: cfg.header_read_timeout,
                http2: cfg.http2_idle_timeout,
            },
            proxy_protocol_from: Arc::from(cfg.proxy_protocol_from.as_slice()),
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            next_conn_id: Arc::new(AtomicU64::new(1)),
            metrics,
            serving,
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open exchanges finish for up to `grace`.
    pub(crate) async fn run(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        // Every connection holds a receiver of what it is asked to do, and the sender's `closed()` resolves when
        // the last connection has gone.
        let (stop, stop_rx) = watch::channel(Stop::Serve);
        tokio::pin!(shutdown);
        let metrics = &self.metrics;
        self.serving.store(true, Ordering::Release);
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (tcp, remote) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            metrics.connections_total.inc();
            let conn = Connection {
                id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
                acceptor: TlsAcceptor::from(self.tls.server()),
                proxy: Arc::clone(&self.proxy),
                metrics: Arc::clone(metrics),
                http: self.http.clone(),
                handshake_timeout: self.handshake_timeout,
                idle: self.idle,
                proxy_protocol_from: Arc::clone(&self.proxy_protocol_from),
            };
            let guard = ConnGuard {
                _permit: permit,
                _active: ActiveConnection::new(Arc::clone(metrics)),
            };
            let stop = stop_rx.clone();
            tokio::spawn(conn.serve(tcp, remote, guard, stop));
        }
        drop(self.listener);
        drop(stop_rx);
        // Draining: a load balancer polling /readyz takes this instance out of rotation.
        self.serving.store(false, Ordering::Release);
        tracing::info!("listener closed; draining open connections");
        let _ = stop.send(Stop::Drain);
        if tokio::time::timeout(grace, stop.closed()).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "grace period over; closing remaining connections"
            );
            // Dropping an exchange ends it (`client_closed`) and queues its response record, so the records are
            // queued before the caller closes the audit log rather than lost with the runtime.
            let _ = stop.send(Stop::Drop);
            if tokio::time::timeout(CLOSE_GRACE, stop.closed())
                .await
                .is_err()
            {
                tracing::warn!("connections still in their handshake at shutdown");
            }
        }
    }
}

/// What the listener asks of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Serve,
    /// Finish the exchanges in flight, take no new requests, then close (HTTP/2: GOAWAY).
    Drain,
    /// The grace period is over: drop the connection and whatever is in flight on it.
    Drop,
}

/// What a consumer connection holds for as long as it is open, including its staged close: its place under
/// `server.max_connections` and its count in `ssp_connections_active`.
#[derive(Debug)]
pub(super) struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _active: ActiveConnection,
}

/// Counts a consumer connection in `ssp_connections_active` for as long as it lives.
#[derive(Debug)]
pub(super) struct ActiveConnection(Arc<crate::metrics::Metrics>);

impl ActiveConnection {
    pub(super) fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.connections_active.inc();
        Self(metrics)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}
