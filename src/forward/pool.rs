//! The upstream client the proxy owns: provider connections on hyper's `client::conn::http1`, a pool of idle
//! ones per provider, the connection limit per provider, the timeouts, and the retry of a request that met a
//! stale pooled connection.
//!
//! A provider connection has no task of its own. Whoever uses it drives it: the request's task while it waits for
//! the response head, then the response body as the consumer's connection reads it ([`ProviderBody`]). An exchange
//! therefore runs on the thread that accepted the consumer's connection, with no channel hop to a connection task
//! on another thread. An idle connection is driven by nobody; the next request to take it drives it until it is
//! ready, and one that closed while idle is found then (or by the sweep) and dropped.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::connector::{ConnectError, ProviderStream};
use super::headers::{
    MAX_RESPONSE_FIELDS, MAX_RESPONSE_HEAD, is_head_too_large, response_framing, response_head_len,
};
use super::idle_conns::IdleConns;
use super::{
    BoxError, ClientFields, Connector, Direction, ForwardError, IdleTimeout, SharedExchange,
    Streamed, rewrite_request_headers, strip_hop_by_hop,
};
use crate::config::UpstreamConfig;
use crate::ids::IdMap;
use crate::policy::Permit;

/// The request body sent upstream: the consumer's body, streamed; none for a request without one (a `GET`) and
/// for the retry of such a request.
///
/// Boxed because every request crosses hyper's dispatch channel to its provider connection inside a `Request`
/// of this body, and each provider connection keeps two 32-slot blocks of that channel: the box takes a slot from
/// 344 to 256 bytes (some 5.6 KiB a connection), and only a request that has a body pays for it.
#[derive(Debug)]
pub(crate) struct RequestBody(Option<Box<Streamed<Incoming>>>);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.0.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

type Io = TokioIo<ProviderStream>;

/// The most a provider connection's read buffer grows to, in bytes (a response head must fit in it, see
/// [`MAX_RESPONSE_HEAD`], and bodies stream through it). hyper's default, about 400 KiB, is what each connection's
/// buffer reached while streaming a large body, and kept while the connection was pooled: the load benchmark's
/// body phases peaked 4 MiB above its 256-connection phase.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// One TLS connection to a provider: the sending half and the HTTP/1.1 state machine that reads and writes it.
struct Conn {
    send: http1::SendRequest<RequestBody>,
    /// Boxed (one allocation per connection): the state machine with its TLS session and buffers is about
    /// 1.7 KiB, and a `Conn` moves in and out of the pool, and through the futures of each exchange, per request.
    driver: Box<http1::Connection<Io, RequestBody>>,
    /// The state machine has finished: the connection closed or failed, and must not be polled again.
    done: bool,
    /// Response heads received on it: a failure on a connection that had delivered one is a stale reuse.
    responses: u64,
    /// The thread that opened it, whose runtime's reactor watches its socket: reused there first.
    home: ThreadId,
    /// Its place under `limits.per_provider_connections`, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// Drives the state machine once (reading, writing, both bodies); false once the connection has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done {
            if let Poll::Ready(result) = Pin::new(&mut self.driver).poll(cx) {
                self.done = true;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "provider connection ended with an error");
                }
            }
        }
        !self.done
    }

    /// Drives the connection until it can take a request: `false` when it closed instead.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.drive(cx) {
            return Poll::Ready(false);
        }
        self.send.poll_ready(cx).map(|ready| ready.is_ok())
    }
}

/// One provider origin (RFC 9110 section 4.3.1: scheme `https`, `host:port`): its connection limit and its idle
/// connections.
struct Origin {
    /// As in a URI: an IPv6 literal bracketed.
    name: Box<str>,
    port: u16,
    /// Lower-case `host:port`: the pool's key and `upstream.resolve`'s.
    key: Arc<str>,
    /// Bounds the connections open to this provider, idle ones included.
    slots: Arc<Semaphore>,
    idle: Mutex<IdleConns<Conn>>,
    /// Signalled when a connection goes idle, for a request waiting for a slot.
    returned: Notify,
}

impl Origin {
    /// An idle connection that has not outlived `idle_timeout`: one this thread opened, or another thread's when
    /// no new connection may be opened (see [`IdleConns::take`]).
    fn take_idle(&self, idle_timeout: Duration) -> Option<Conn> {
        let foreign = self.slots.available_permits() == 0;
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(
                std::thread::current().id(),
                Instant::now(),
                idle_timeout,
                foreign,
            )
    }

    /// Whether [`Origin::take_idle`] would find a connection.
    fn has_idle(&self) -> bool {
        let foreign = self.slots.available_permits() == 0;
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has(std::thread::current().id(), foreign)
    }

    /// Keeps a connection whose exchange ended cleanly for the next request, within `max_idle`.
    fn put_back(&self, conn: Conn, max_idle: usize) {
        if conn.done || conn.send.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() >= max_idle {
                return;
            }
            idle.push(conn.home, conn, Instant::now());
        }
        self.returned.notify_one();
    }

    /// Drops idle connections that expired or that the provider closed (a look at each, without waiting).
    fn sweep(&self, idle_timeout: Duration) {
        let mut cx = Context::from_waker(Waker::noop());
        let now = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|since, conn| {
                now.duration_since(since) < idle_timeout
                    && !matches!(conn.poll_ready(&mut cx), Poll::Ready(false))
            });
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("key", &self.key).finish()
    }
}

/// The provider connections, by provider.
#[derive(Debug)]
struct Pool {
    connector: Connector,
    /// Only permitted targets' providers are ever added, so the map holds registered endpoints only.
    hosts: Mutex<IdMap<Arc<str>, Arc<Origin>>>,
    per_provider_connections: usize,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    http1: http1::Builder,
}

/// How a request failed on a connection, and whether that connection had been used before.
struct Failure {
    error: BoxError,
    /// The connection had delivered a response before this request.
    reused: bool,
}

impl Pool {
    /// The provider of `uri` (a permitted target's: absolute, with a host).
    fn host(&self, uri: &Uri) -> Result<Arc<Origin>, ForwardError> {
        let Some(name) = uri.host() else {
            return Err(ForwardError::Unreachable(Box::new(ConnectError(
                "no host in target".into(),
            ))));
        };
        let port = uri.port_u16().unwrap_or(443);
        thread_local! {
            /// The key of the provider being looked up, built here rather than allocated per request.
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let found = KEY.with_borrow_mut(|key| {
            use std::fmt::Write;
            key.clear();
            key.extend(name.chars().map(|c| c.to_ascii_lowercase()));
            let _ = write!(key, ":{port}");
            let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
            hosts
                .get(key.as_str())
                .map(Arc::clone)
                .ok_or_else(|| key.clone())
        });
        let key = match found {
            Ok(host) => return Ok(host),
            Err(key) => key,
        };
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = hosts.get(key.as_str()) {
            return Ok(Arc::clone(host));
        }
        let key: Arc<str> = Arc::from(key);
        let host = Arc::new(Origin {
            name: name.into(),
            port,
            key: Arc::clone(&key),
            slots: Arc::new(Semaphore::new(self.per_provider_connections)),
            idle: Mutex::default(),
            returned: Notify::new(),
        });
        hosts.insert(key, Arc::clone(&host));
        Ok(host)
    }

    /// A connection ready for a request: an idle one when `reuse`, else (or when there is none) a new one once a
    /// slot is free. Waiting for a slot, an idle connection that comes back is taken instead. Bounded by
    /// `upstream.connect_timeout`.
    async fn checkout(&self, host: &Origin, reuse: bool) -> Result<Conn, BoxError> {
        let get = async {
            loop {
                while let Some(mut conn) =
                    reuse.then(|| host.take_idle(self.idle_timeout)).flatten()
                {
                    if poll_fn(|cx| conn.poll_ready(cx)).await {
                        return Ok(conn);
                    }
                    // Closed while idle: dropped here, which frees its slot.
                }
                let mut returned = pin!(host.returned.notified());
                returned.as_mut().enable();
                if reuse && host.has_idle() {
                    continue;
                }
                tokio::select! {
                    slot = Arc::clone(&host.slots).acquire_owned() => {
                        let slot = slot.map_err(|_| io::Error::other("provider connection limit closed"))?;
                        // Boxed: dialling (TCP, TLS, HTTP/1 handshakes) is the largest state of this future by
                        // far, and only a new connection needs it; unboxed, every exchange's future (and every
                        // future that holds one) would carry, and move, its size.
                        return Box::pin(self.open(host, slot)).await;
                    }
                    () = returned => {}
                }
            }
        };
        match tokio::time::timeout(self.connector.connect_timeout, get).await {
            Ok(result) => result,
            Err(_) => Err(Box::new(ConnectError("connect timed out".into()))),
        }
    }

    async fn open(&self, host: &Origin, slot: OwnedSemaphorePermit) -> Result<Conn, BoxError> {
        let stream = self
            .connector
            .dial(&host.name, host.port, &host.key)
            .await?;
        let (send, driver) = self.http1.handshake(TokioIo::new(stream)).await?;
        Ok(Conn {
            send,
            driver: Box::new(driver),
            done: false,
            responses: 0,
            home: std::thread::current().id(),
            _slot: slot,
        })
    }

    /// Sends `request` on a connection (a pooled one when `reuse`) and drives it until the response head.
    async fn exchange(
        &self,
        host: &Origin,
        request: Request<RequestBody>,
        reuse: bool,
    ) -> Result<(Response<Incoming>, Conn), Failure> {
        let mut conn = self.checkout(host, reuse).await.map_err(|error| Failure {
            error,
            reused: false,
        })?;
        let reused = conn.responses > 0;
        let mut response = pin!(conn.send.send_request(request));
        let result = poll_fn(|cx| {
            let open = conn.drive(cx);
            match response.as_mut().poll(cx) {
                Poll::Pending if !open => Poll::Ready(Err(None)),
                Poll::Pending => Poll::Pending,
                Poll::Ready(result) => Poll::Ready(result.map_err(Some)),
            }
        })
        .await;
        match result {
            Ok(response) => {
                conn.responses += 1;
                Ok((response, conn))
            }
            Err(error) => Err(Failure {
                error: match error {
                    Some(e) => Box::new(e),
                    None => Box::new(ClosedBeforeResponse),
                },
                reused,
            }),
        }
    }
}

/// A provider's response body, driving its connection as it is read; when it ends cleanly the connection goes
/// back to the pool, and when it is dropped before its end the connection is closed.
pub(crate) struct ProviderBody {
    body: Incoming,
    conn: Option<Conn>,
    host: Arc<Origin>,
    pool: Arc<Pool>,
    /// Says whether the request body has all gone out: a provider that answered before reading all of it leaves
    /// a connection that cannot carry another request, and it is closed instead of pooled.
    exchange: SharedExchange,
    /// An error held back for one turn (see `poll_frame`).
    failed: Option<hyper::Error>,
}

impl std::fmt::Debug for ProviderBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderBody")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl ProviderBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.exchange.request_sent()
        {
            self.host.put_back(conn, self.pool.max_idle_per_host);
        }
    }
}

impl Body for ProviderBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            if let Some(conn) = this.conn.as_mut() {
                conn.drive(cx);
                frame = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
        if let Poll::Ready(Some(Err(e))) = frame {
            // Driving the connection here can hand over the last data and the failure (a provider that closed
            // without TLS close_notify) in one turn; the consumer's connection gives up unflushed bytes on a body
            // error, so the error waits one turn and the bytes that arrived reach the consumer first.
            this.conn = None;
            this.failed = Some(e);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.release(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ProviderBody {
    fn drop(&mut self) {
        // A body that is complete as it stands (204, `Content-Length: 0`, HEAD) is never polled.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// The upstream client and its timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pool: Arc<Pool>,
    response_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(
        cfg: &UpstreamConfig,
        per_provider_connections: u32,
        tls: Arc<crate::tls::Reloadable>,
    ) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .max_buf_size(MAX_READ_BUFFER)
            .max_headers(MAX_RESPONSE_FIELDS);
        let pool = Pool {
            connector: Connector {
                tls,
                resolve: Arc::new(cfg.resolve.clone()),
                connect_timeout: cfg.connect_timeout,
            },
            hosts: Mutex::default(),
            per_provider_connections: per_provider_connections.max(1) as usize,
            max_idle_per_host: cfg.pool_max_idle_per_host,
            idle_timeout: cfg.pool_idle_timeout,
            http1,
        };
        Self {
            pool: Arc::new(pool),
            response_timeout: cfg.response_timeout,
            body_idle_timeout: cfg.body_idle_timeout,
        }
    }

    pub(crate) fn body_idle_timeout(&self) -> Duration {
        self.body_idle_timeout
    }

    /// Runs for ever: every half `upstream.pool_idle_timeout` (between 1 and 30 s), drops idle provider
    /// connections that expired or that their provider closed, freeing their slots and descriptors.
    pub(crate) async fn sweep_idle(self) {
        let period =
            (self.pool.idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let hosts: Vec<Arc<Origin>> = self
                .pool
                .hosts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect();
            for host in hosts {
                host.sweep(self.pool.idle_timeout);
            }
        }
    }

    /// Sends a permitted request (its headers normalised by [`normalize_request_headers`], as the pipeline does
    /// before the checks) to its target and waits for the response headers, at most `response_timeout`
    /// (retry included). Dropping the returned future (the consumer went away) closes the provider connection.
    ///
    /// The request goes out in origin form (RFC 9112 section 3.2.1) with the target's authority as `Host`.
    ///
    /// The retry rule (RFC 9110 section 9.2.2): a request with an idempotent method and no body that fails on a
    /// reused pooled connection before its response head (the provider's keep-alive close raced it) is sent once
    /// more, on a new connection, and the exchange records `retried`. A request with a body, or with a method
    /// that is not idempotent, is never retried.
    ///
    /// [`normalize_request_headers`]: super::normalize_request_headers
    pub(crate) async fn send(
        &self,
        permit: &Permit,
        request: Request<Incoming>,
        client: &ClientFields,
        exchange: &SharedExchange,
    ) -> Result<Response<ProviderBody>, ForwardError> {
        let (mut parts, body) = request.into_parts();
        let target = permit.target();
        let host = self.pool.host(target.uri())?;
        parts.uri = target
            .uri()
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        // The pool speaks HTTP/1.1 only; an h2 consumer's request is re-versioned.
        parts.version = Version::HTTP_11;
        rewrite_request_headers(&mut parts.headers, target.authority(), client);
        // Kept for a retry only when one is allowed; the header values share the request's buffers.
        let again = (parts.method.is_idempotent() && body.is_end_stream()).then(|| {
            let mut again = Request::new(RequestBody(None));
            *again.method_mut() = parts.method.clone();
            *again.uri_mut() = parts.uri.clone();
            *again.version_mut() = Version::HTTP_11;
            *again.headers_mut() = parts.headers.clone();
            again
        });
        let body = if body.is_end_stream() {
            // Nothing to stream: the request is sent once its head is.
            exchange.mark_request_sent();
            RequestBody(None)
        } else {
            RequestBody(Some(Box::new(Streamed::new(
                body,
                self.body_idle_timeout,
                Arc::clone(exchange),
                Direction::Request,
            ))))
        };
        let request = Request::from_parts(parts, body);
        let deadline = Instant::now() + self.response_timeout;
        let mut result =
            tokio::time::timeout_at(deadline, self.pool.exchange(&host, request, true)).await;
        if let (Ok(Err(failure)), Some(again)) = (&result, again) {
            if failure.reused && on_stale_connection(&*failure.error) {
                tracing::info!(
                    target_host = target.authority(),
                    error = %failure.error,
                    "stale pooled provider connection: closed before the response head; retrying once on a new connection"
                );
                exchange.retried();
                result = tokio::time::timeout_at(deadline, self.pool.exchange(&host, again, false))
                    .await;
            }
        }
        match result {
            Ok(Ok((response, _)))
                if response_head_len(response.status(), response.headers()) > MAX_RESPONSE_HEAD =>
            {
                // Not forwarded; the connection, its response unread, is dropped (closed), not pooled.
                Err(ForwardError::HeadTooLarge)
            }
            Ok(Ok((response, conn))) => {
                let (mut parts, body) = response.into_parts();
                // Not forwarded when refused: the connection (switched, or mid-way through a body it cannot
                // frame) is dropped with the response, which closes it.
                response_framing(&mut parts).map_err(ForwardError::BadResponse)?;
                strip_hop_by_hop(&mut parts.headers);
                let body = ProviderBody {
                    body,
                    conn: Some(conn),
                    host,
                    pool: Arc::clone(&self.pool),
                    exchange: Arc::clone(exchange),
                    failed: None,
                };
                Ok(Response::from_parts(parts, body))
            }
            // The consumer's body went quiet: a timeout, as the exchange records it, not an unreachable provider.
            Ok(Err(_)) if exchange.request_body_malformed() => {
                Err(ForwardError::MalformedRequestBody)
            }
            Ok(Err(failure)) if is_idle_timeout(&*failure.error) => Err(ForwardError::Timeout),
            Ok(Err(failure)) if is_head_too_large(&*failure.error) => {
                Err(ForwardError::HeadTooLarge)
            }
            Ok(Err(failure)) => Err(ForwardError::Unreachable(failure.error)),
            Err(_) => Err(ForwardError::Timeout),
        }
    }
}

/// A provider connection that ended before the response head, without an error of its own.
#[derive(Debug)]
struct ClosedBeforeResponse;

impl std::fmt::Display for ClosedBeforeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("provider connection closed before the response")
    }
}

impl std::error::Error for ClosedBeforeResponse {}

/// True when `e`, on a connection that had already delivered a response, is the connection closing or resetting
/// before this response's head.
fn on_stale_connection(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(source) = next {
        if let Some(h) = source.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        if let Some(io) = source.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            );
        }
        if source.is::<ClosedBeforeResponse>() {
            return true;
        }
        next = source.source();
    }
    false
}

/// True when [`IdleTimeout`] is somewhere in the error's source chain.
fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    super::in_source_chain(e, |e| e.is::<IdleTimeout>())
}
