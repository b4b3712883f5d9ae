//! The consumer-facing listener: accept loop, connection limit, TLS handshake with its timeout, the peer identity
//! read once per connection, HTTP/1.1 and HTTP/2 (by ALPN) with hyper's header-read timeout, the idle rule, a
//! graceful drain on shutdown, and the staged close of every connection ssp ends (RFC 9112 section 9.6). Knows
//! nothing of request contents: each request goes to [`Proxy::handle`].
//!
//! The idle rule: a connection with no request in flight (from the end of the handshake, and from the end of each
//! response) is shut down once it has been idle for `server.header_read_timeout` (HTTP/1.1, or before the protocol
//! is known) or `server.http2_idle_timeout` (HTTP/2: GOAWAY, then close), whatever it sends or does not send.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};
use crate::proxy_header::{ProxyHeader, ProxyHeaderError};
use crate::tls;

/// A bound consumer listener, ready to run.
pub struct Server {
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
        // Every connection holds a receiver: `true` asks it to finish gracefully, and the sender's `closed()`
        // resolves when the last connection has gone.
        let (stop, stop_rx) = watch::channel(false);
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
                idle: self.idle,
                proxy_protocol_from: Arc::clone(&self.proxy_protocol_from),
            };
            let guard = ConnGuard {
                _permit: permit,
                _active: ActiveConnection::new(Arc::clone(&metrics)),
            };
            let stop = stop_rx.clone();
            tokio::spawn(conn.serve(tcp, remote, guard, stop));
        }
        drop(self.listener);
        drop(stop_rx);
        // Draining: a load balancer polling /readyz takes this instance out of rotation.
        self.health.serving.store(false, Ordering::Release);
        tracing::info!("listener closed; draining open connections");
        let _ = stop.send(true);
        if tokio::time::timeout(grace, stop.closed()).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "grace period over; closing remaining connections"
            );
        }
        admin.abort();
    }
}

/// How long a connection may stay with no request in flight (the idle rule in the module docs).
#[derive(Debug, Clone, Copy)]
struct IdleTimeouts {
    http1: Duration,
    http2: Duration,
}

/// What a consumer connection holds for as long as it is open, including its staged close: its place under
/// `server.max_connections` and its count in `ssp_connections_active`.
#[derive(Debug)]
struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    _active: ActiveConnection,
}

/// Counts a consumer connection in `ssp_connections_active` for as long as it lives.
#[derive(Debug)]
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
    idle: IdleTimeouts,
    proxy_protocol_from: Arc<[ipnet::IpNet]>,
}

impl Connection {
    async fn serve(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
        guard: ConnGuard,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        let deadline = Instant::now() + self.handshake_timeout;
        // From a trusted balancer the connection starts with a PROXY header naming the consumer; the balancer's
        // own address is kept as `via`. The header's read is bounded by the handshake timeout.
        let balancer = remote.ip().to_canonical();
        let (remote, via) = if self
            .proxy_protocol_from
            .iter()
            .any(|n| n.contains(&balancer))
        {
            match tokio::time::timeout_at(deadline, crate::proxy_header::read(&mut tcp)).await {
                Ok(Ok(ProxyHeader::Relayed(consumer))) => (consumer, Some(remote)),
                Ok(Ok(ProxyHeader::Local)) => (remote, None),
                Ok(Err(ProxyHeaderError::Closed)) => return,
                Ok(Err(e)) => {
                    self.proxy.metrics().tls_failure(e.reason());
                    tracing::info!(conn = self.id, %remote, error = %e, "PROXY protocol header refused; closing");
                    close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                    return;
                }
                Err(_) => {
                    self.proxy.metrics().tls_failure("timeout");
                    tracing::info!(conn = self.id, %remote, "PROXY protocol header timed out");
                    return;
                }
            }
        } else {
            (remote, None)
        };
        // Plain HTTP sent to this port gets one short plain-text answer instead of a TLS alert it cannot read.
        // A TLS ClientHello starts with 0x16; an HTTP request line with an upper-case method letter. A PROXY
        // header from a source not in `server.proxy_protocol_from` is refused: it could name any address.
        let mut first = [0u8; 12];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(n @ 1..)) if crate::proxy_header::looks_like_proxy_header(&first[..n]) => {
                self.proxy.metrics().tls_failure("proxy_header_untrusted");
                tracing::warn!(
                    conn = self.id,
                    %remote,
                    "PROXY protocol header from a source not in server.proxy_protocol_from; closing"
                );
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            Ok(Ok(1..)) if first[0].is_ascii_uppercase() => {
                self.proxy.metrics().tls_failure("plaintext_http");
                tracing::info!(conn = self.id, %remote, "plain HTTP on the TLS port; answered 400");
                let _ = tokio::time::timeout_at(deadline, tcp.write_all(PLAINTEXT_ANSWER)).await;
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            // Closed before sending a byte: a TCP health check or a port probe, not a failed handshake.
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                self.proxy.metrics().tls_failure("timeout");
                tracing::info!(conn = self.id, %remote, "TLS handshake timed out");
                return;
            }
        }
        // Check 1: the handshake verifies the chain, expiry, CRL and TLS version; failing it ends the connection
        // with no HTTP at all. rustls has written its alert by then; the staged close keeps the client's unread
        // handshake bytes from turning the close into a reset that would destroy the alert.
        let accept = self.acceptor.accept(tcp).into_fallible();
        let tls = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err((e, tcp))) => {
                self.proxy
                    .metrics()
                    .tls_failure(crate::metrics::tls_failure_reason(&e));
                tracing::info!(conn = self.id, %remote, error = %e, "TLS handshake refused");
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            Err(_) => {
                self.proxy.metrics().tls_failure("timeout");
                tracing::info!(conn = self.id, %remote, "TLS handshake timed out");
                return;
            }
        };
        let session = tls.get_ref().1;
        let peer = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(tls::peer_identity);
        let idle_timeout = match session.alpn_protocol() {
            Some(b"h2") => self.idle.http2,
            _ => self.idle.http1,
        };
        let Some(peer) = peer else {
            tracing::warn!(conn = self.id, %remote, "verified client certificate could not be read; closing");
            return;
        };
        tracing::debug!(conn = self.id, %remote, ?via, subject = %peer.subject, "connection accepted");
        let audit_peer = Arc::new(crate::audit::Peer::new(remote, via, &peer));
        let info = Arc::new(ConnInfo {
            id: self.id,
            remote,
            peer,
            audit_peer,
        });
        let activity = Arc::new(Activity::new());
        let proxy = self.proxy;
        let service = {
            let activity = Arc::clone(&activity);
            service_fn(move |request| {
                let proxy = Arc::clone(&proxy);
                let info = Arc::clone(&info);
                // In flight from the complete request head until hyper has sent (or dropped) the response body.
                let busy = activity.busy();
                async move {
                    let response = proxy.handle(request, &info).await?;
                    Ok::<_, std::convert::Infallible>(
                        response.map(|body| Tracked { body, _busy: busy }),
                    )
                }
            })
        };
        let io = ConsumerIo::new(tls, guard);
        let connection = self.http.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut closing = false;
        // Once an idle connection has been asked to close (HTTP/2: GOAWAY and a PING whose answer hyper awaits), a
        // client that never answers must not keep it: after CLOSE_GRACE with nothing in flight it is dropped.
        let mut idle_closing = false;
        let hard_close = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(hard_close);
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break Some(result),
                _ = stop.changed(), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = idle.as_mut(), if !closing => {
                    match activity.idle_until(idle_timeout) {
                        Some(end) if end <= Instant::now() => {
                            tracing::debug!(conn = self.id, idle_s = idle_timeout.as_secs_f64(), "idle connection closed");
                            closing = true;
                            idle_closing = true;
                            hard_close.as_mut().reset(Instant::now() + CLOSE_GRACE);
                            connection.as_mut().graceful_shutdown();
                        }
                        Some(end) => idle.as_mut().reset(end),
                        None => idle.as_mut().reset(Instant::now() + idle_timeout),
                    }
                }
                () = hard_close.as_mut(), if idle_closing => {
                    if activity.idle_until(Duration::ZERO).is_some() {
                        tracing::debug!(conn = self.id, "closing connection did not finish within its grace; dropped");
                        break None;
                    }
                    // A stream opened before the GOAWAY reached the client is still being served.
                    hard_close.as_mut().reset(Instant::now() + CLOSE_GRACE);
                }
            }
        };
        if let Some(Err(e)) = result {
            tracing::debug!(conn = self.id, error = %e, "connection ended with an error");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The idle rule.

/// Requests in flight on one connection, and since when it has had none. Updated by the requests themselves; read
/// by the connection's idle timer only when it fires, so a busy connection costs no timer updates.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicU64,
    /// Milliseconds from `opened` to the end of the last request.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// When the connection's idle time runs out, or `None` while a request is in flight.
    fn idle_until(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.opened + since + timeout)
    }
}

/// One request in flight; when dropped (its response body sent or abandoned) the connection may go idle.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let ms = self.0.opened.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until hyper lets go of it.
    struct Tracked<B> {
        #[pin]
        body: B,
        _busy: Busy,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The staged close (RFC 9112 section 9.6).

/// Longest a closing connection keeps reading and discarding what the client still sends (nginx's
/// `lingering_time` is the same): a refused upload on a slow link still gets its answer.
pub const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest a closing connection waits for the client's next bytes (nginx's `lingering_timeout`).
pub const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Most bytes a closing connection reads and discards.
pub const LINGER_BYTES: u64 = 256 * 1024 * 1024;
/// How long an idle connection asked to close may take to finish (an HTTP/2 client answering the GOAWAY's PING)
/// before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Closes a connection ssp is ending in stages, so that the answer (or TLS alert) already written reaches the
/// client: shut down the write side, read and discard what the client still sends for at most [`LINGER_TIME`]
/// and [`LINGER_BYTES`] (and [`LINGER_IDLE`] between reads), then close. Closing at once with unread bytes in the receive buffer would make the kernel
/// send a reset, which can destroy the answer in flight. The connection's guard is held until the end.
async fn close_in_stages(mut tcp: TcpStream, guard: ConnGuard, deadline: Instant) {
    // A second shutdown of the write side (after TLS's own) is harmless; the first waits for nothing.
    let _ = tokio::time::timeout(LINGER_IDLE, tcp.shutdown()).await;
    drain_until(&mut tcp, deadline).await;
    drop(tcp);
    drop(guard);
}

/// As [`close_in_stages`] for a TLS connection whose close_notify may not have been sent: send it (bounded by the
/// same deadline), then go on at the TCP level, where the client's remaining records are discarded unread.
async fn close_tls_in_stages(mut tls: TlsStream<TcpStream>, guard: ConnGuard) {
    let deadline = Instant::now() + LINGER_TIME;
    // A client that reads nothing cannot hold the close_notify's flush for longer than the idle bound.
    let _ = tokio::time::timeout(LINGER_IDLE, tls.shutdown()).await;
    let (tcp, _) = tls.into_inner();
    close_in_stages(tcp, guard, deadline).await;
}

/// Reads and discards until end of stream, an error, `deadline` or [`LINGER_BYTES`].
async fn drain_until<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0u64;
    while seen <= LINGER_BYTES {
        let next = deadline.min(Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(next, stream.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => seen += n as u64,
            ended => {
                tracing::debug!(drained = seen, ?ended, "staged close ended");
                return;
            }
        }
    }
    tracing::debug!(drained = seen, "staged close ended at its byte bound");
}

/// A consumer's TLS stream as hyper serves it. When hyper lets go of it while the client has not closed its side
/// (ssp ended the connection: `Connection: close`, a 431, a timeout, the idle rule, shutdown), the rest of the
/// close is staged on a task of its own: [`close_in_stages`], TLS close_notify first when hyper did not send it.
struct ConsumerIo {
    tls: Option<TlsStream<TcpStream>>,
    /// A read returned end of stream: the client has closed its side, nothing more can arrive.
    peer_closed: bool,
    /// hyper shut the write side down (close_notify sent, TCP FIN).
    write_closed: bool,
    guard: Option<ConnGuard>,
}

impl std::fmt::Debug for ConsumerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerIo")
            .field("peer_closed", &self.peer_closed)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl ConsumerIo {
    fn new(tls: TlsStream<TcpStream>, guard: ConnGuard) -> Self {
        Self {
            tls: Some(tls),
            peer_closed: false,
            write_closed: false,
            guard: Some(guard),
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TlsStream<TcpStream>>> {
        self.tls
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for ConsumerIo {
    fn drop(&mut self) {
        let (Some(tls), Some(guard)) = (self.tls.take(), self.guard.take()) else {
            return;
        };
        tracing::debug!(
            peer_closed = self.peer_closed,
            write_closed = self.write_closed,
            "connection released"
        );
        if self.peer_closed {
            return;
        }
        // Outside a runtime (the process is ending) there is no one left to answer.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.write_closed {
            // close_notify is out: what follows is raw TCP.
            let (tcp, _) = tls.into_inner();
            runtime.spawn(close_in_stages(tcp, guard, Instant::now() + LINGER_TIME));
        } else {
            runtime.spawn(close_tls_in_stages(tls, guard));
        }
    }
}

impl AsyncRead for ConsumerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(self.stream()?.poll_read(cx, buf));
        if result.is_ok() && buf.filled().len() == before && buf.remaining() > 0 {
            self.peer_closed = true;
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for ConsumerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream()?.poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = ready!(self.stream()?.poll_shutdown(cx));
        self.write_closed = true;
        Poll::Ready(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }
}
