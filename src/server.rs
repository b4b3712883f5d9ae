//! The consumer-facing listener: accept loop, connection limit, TLS handshake with its timeout, the peer identity
//! read once per connection, HTTP/1.1 and HTTP/2 (by ALPN) with hyper's header-read timeout, and a graceful drain
//! on shutdown. Knows nothing of request contents: each request goes to [`Proxy::handle`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};
use crate::tls;

/// A bound consumer listener, ready to run.
pub struct Server {
    listener: TcpListener,
    /// Read once per accepted connection, so a reload applies to every new handshake.
    tls: Arc<crate::tls::Reloadable>,
    proxy: Arc<Proxy>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    /// Bounds concurrent connections; when exhausted, further connections wait in the kernel's backlog.
    connections: Arc<Semaphore>,
    next_conn_id: Arc<AtomicU64>,
    /// The admin listener (/metrics, /healthz, /readyz), served for as long as `run`.
    admin: TcpListener,
    health: Arc<crate::admin::Health>,
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
    /// Binds the listener. Fails only on the socket.
    pub async fn bind(
        cfg: &ServerConfig,
        limits: &crate::config::LimitsConfig,
        tls: Arc<crate::tls::Reloadable>,
        proxy: Arc<Proxy>,
        admin: SocketAddr,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let admin = TcpListener::bind(admin).await?;
        let health = Arc::new(crate::admin::Health {
            serving: std::sync::atomic::AtomicBool::new(false),
            audit: Arc::clone(proxy.audit()),
        });
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
            .max_buf_size((limits.max_header_bytes * 2 + 16 * 1024).max(8192));
        http.http2().timer(TokioTimer::new()).max_header_list_size(
            u32::try_from(limits.max_header_bytes * 2 + 16 * 1024).unwrap_or(u32::MAX),
        );
        Ok(Self {
            listener,
            tls,
            proxy,
            http,
            handshake_timeout: cfg.handshake_timeout,
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            next_conn_id: Arc::new(AtomicU64::new(1)),
            admin,
            health,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The TLS material in force, for reloads.
    pub fn tls(&self) -> Arc<crate::tls::Reloadable> {
        Arc::clone(&self.tls)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The request pipeline, for reloads.
    pub fn proxy(&self) -> Arc<Proxy> {
        Arc::clone(&self.proxy)
    }

    /// The audit log the proxy writes to, for closing it after `run`.
    pub fn audit(&self) -> Arc<crate::audit::AuditLog> {
        Arc::clone(self.proxy.audit())
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open exchanges finish for up to `grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        let metrics = Arc::clone(self.proxy.metrics());
        let admin = tokio::spawn(crate::admin::serve(
            self.admin,
            Arc::clone(&metrics),
            Arc::clone(&self.health),
        ));
        self.health.serving.store(true, Ordering::Release);
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
                http: self.http.clone(),
                handshake_timeout: self.handshake_timeout,
            };
            let watcher = graceful.watcher();
            let active = ActiveConnection::new(Arc::clone(&metrics));
            tokio::spawn(async move {
                let _permit = permit;
                let _active = active;
                conn.serve(tcp, remote, watcher).await;
            });
        }
        drop(self.listener);
        // Draining: a load balancer polling /readyz takes this instance out of rotation.
        self.health.serving.store(false, Ordering::Release);
        tracing::info!("listener closed; draining open connections");
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "grace period over; closing remaining connections"
            );
        }
        admin.abort();
    }
}

/// Counts a consumer connection in `ssp_connections_active` for as long as it lives.
struct ActiveConnection(Arc<crate::metrics::Metrics>);

impl ActiveConnection {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.connections_active.inc();
        Self(metrics)
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

/// The whole answer to plain HTTP on the TLS port.
const PLAINTEXT_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 78\r\nConnection: close\r\n\r\nThis port speaks HTTPS with TLS mutual authentication; plain HTTP is refused.\n";

/// One accepted TCP connection on its way to being served.
struct Connection {
    id: u64,
    acceptor: TlsAcceptor,
    proxy: Arc<Proxy>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
}

impl Connection {
    async fn serve(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let _ = tcp.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        // Plain HTTP sent to this port gets one short plain-text answer instead of a TLS alert it cannot read.
        // A TLS ClientHello starts with 0x16; an HTTP request line with an upper-case method letter.
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(1..)) if first[0].is_ascii_uppercase() => {
                self.proxy.metrics().tls_failure("plaintext_http");
                tracing::info!(conn = self.id, %remote, "plain HTTP on the TLS port; answered 400");
                let mut tcp = tcp;
                let _ = tokio::time::timeout_at(deadline, async {
                    tokio::io::AsyncWriteExt::write_all(&mut tcp, PLAINTEXT_ANSWER).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut tcp).await
                })
                .await;
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                self.proxy.metrics().tls_failure("timeout");
                tracing::info!(conn = self.id, %remote, "TLS handshake timed out");
                return;
            }
        }
        // Check 1: the handshake verifies the chain, expiry, CRL and TLS version; failing it ends the connection
        // with no HTTP at all.
        let tls = match tokio::time::timeout_at(deadline, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.proxy
                    .metrics()
                    .tls_failure(crate::metrics::tls_failure_reason(&e));
                tracing::info!(conn = self.id, %remote, error = %e, "TLS handshake refused");
                return;
            }
            Err(_) => {
                self.proxy.metrics().tls_failure("timeout");
                tracing::info!(conn = self.id, %remote, "TLS handshake timed out");
                return;
            }
        };
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(tls::peer_identity);
        let Some(peer) = peer else {
            tracing::warn!(conn = self.id, %remote, "verified client certificate could not be read; closing");
            return;
        };
        tracing::debug!(conn = self.id, %remote, subject = %peer.subject, "connection accepted");
        let audit_peer = Arc::new(crate::audit::Peer {
            addr: remote.to_string(),
            subject: peer.subject.clone(),
            serial: peer.serial.clone(),
            fingerprint_sha256: peer.fingerprint_sha256.clone(),
        });
        let info = Arc::new(ConnInfo {
            id: self.id,
            remote,
            peer,
            audit_peer,
        });
        let proxy = self.proxy;
        let service = service_fn(move |request| {
            let proxy = Arc::clone(&proxy);
            let info = Arc::clone(&info);
            async move { proxy.handle(request, &info).await }
        });
        let connection = self
            .http
            .serve_connection(TokioIo::new(tls), service)
            .into_owned();
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(conn = self.id, error = %e, "connection ended with an error");
        }
    }
}
