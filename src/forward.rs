//! The upstream leg: a pooled keep-alive HTTP/1.1 client presenting the proxy's client certificate, the header
//! rules of DESIGN.md 1.5, the connect / response / body-idle timeouts, and [`Streamed`], the body wrapper that
//! moves frames through untouched while counting bytes, enforcing the idle timeout and recording how the
//! exchange ended.
//!
//! Takes only a [`Permit`]: there is no way to forward a request the policy did not check. Does not parse
//! consumer input or decide anything.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::audit::Outcome;
use crate::config::UpstreamConfig;
use crate::policy::Permit;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the upstream exchange failed before a response arrived.
#[derive(Debug)]
pub enum ForwardError {
    /// No connection: name resolution, TCP, TLS, or the connection broke before a response (502).
    Unreachable(BoxError),
    /// No response headers within `response_timeout`, or the request body went idle past `body_idle_timeout`
    /// before they came (504).
    Timeout,
}

impl ForwardError {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Unreachable(_) => "unreachable",
            ForwardError::Timeout => "timeout",
        }
    }
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Unreachable(e) => {
                write!(f, "provider unreachable: {e}")?;
                let mut source = e.source();
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            ForwardError::Timeout => {
                f.write_str("timed out before the provider's response headers")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The connector: static resolution first, then DNS; TCP; TLS with the proxy's client certificate.

/// Opens TLS connections to providers for the pooled client.
#[derive(Clone)]
pub struct Connector {
    /// Read once per new provider connection, so a reload applies to new connections and the pool carries on.
    tls: Arc<crate::tls::Reloadable>,
    /// `host:port` (lower case) to the address to dial instead of resolving.
    resolve: Arc<HashMap<String, SocketAddr>>,
    connect_timeout: Duration,
    /// One semaphore per provider `host:port`, bounding the TLS connections held open to it (idle ones
    /// included). The hosts are those of permitted targets, so the map holds registered endpoints only.
    slots: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
    per_provider_connections: usize,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("resolve", &self.resolve)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ConnectError(String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl Connector {
    async fn connect(self, uri: http::Uri) -> Result<UpstreamIo, BoxError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError("no host in target".into()))?;
        let port = uri.port_u16().unwrap_or(443);
        // IPv6 literals come bracketed from `Uri::host`.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = match bare_host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(bare_host.to_owned())
                .map_err(|e| ConnectError(format!("bad server name: {e}")))?,
        };
        let key = format!("{}:{port}", host.to_ascii_lowercase());
        let slots = {
            let mut all = self
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(all.entry(key.clone()).or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(self.per_provider_connections))
            }))
        };
        let dial = async {
            // Waits, within the connect timeout, for one of the provider's connections to close.
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| io::Error::other("provider connection limit closed"))?;
            let addrs: Vec<SocketAddr> = match self.resolve.get(&key) {
                Some(addr) => vec![*addr],
                None => tokio::net::lookup_host((bare_host, port)).await?.collect(),
            };
            let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(tcp) => {
                        tcp.set_nodelay(true)?;
                        let tls = TlsConnector::from(self.tls.client())
                            .connect(server_name.clone(), tcp)
                            .await?;
                        return Ok((tls, slot));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok((tls, slot))) => Ok(UpstreamIo {
                inner: TokioIo::new(tls),
                _slot: slot,
                responses: Responses::default(),
            }),
            Ok(Err(e)) => Err(Box::new(e)),
            Err(_) => Err(Box::new(ConnectError("connect timed out".into()))),
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A TLS connection to a provider, as hyper's client wants it.
#[derive(Debug)]
pub struct UpstreamIo {
    inner: TokioIo<TlsStream<TcpStream>>,
    /// This connection's place under `limits.per_provider_connections`, given back when it closes.
    _slot: tokio::sync::OwnedSemaphorePermit,
    responses: Responses,
}

/// Responses a provider connection has delivered so far (counted as their heads arrive). A request that fails on
/// a connection that had delivered one was sent on a reused, pooled connection: the shape of a provider's
/// keep-alive close racing the next request. hyper-util's `Connected::extra` carries it to both the response and
/// the error.
#[derive(Debug, Clone, Default)]
struct Responses(Arc<AtomicU64>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.responses.clone())
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The upstream client.

/// The request body sent upstream: the consumer's body, streamed.
pub type UpstreamBody = Streamed<Incoming>;

/// The pooled upstream client and its timeouts.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<Connector, UpstreamBody>,
    /// Never pools: the one retry of a request that failed on a stale pooled connection goes out on a new one.
    fresh: Client<Connector, Empty<Bytes>>,
    response_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Upstream {
    pub fn new(
        cfg: &UpstreamConfig,
        per_provider_connections: u32,
        tls: Arc<crate::tls::Reloadable>,
    ) -> Self {
        let connector = Connector {
            tls,
            resolve: Arc::new(cfg.resolve.clone()),
            connect_timeout: cfg.connect_timeout,
            slots: Arc::default(),
            per_provider_connections: per_provider_connections.max(1) as usize,
        };
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the idle timeout silently does nothing.
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .http1_preserve_header_case(true)
            .build(connector.clone());
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_preserve_header_case(true)
            .build(connector);
        Self {
            client,
            fresh,
            response_timeout: cfg.response_timeout,
            body_idle_timeout: cfg.body_idle_timeout,
        }
    }

    pub fn body_idle_timeout(&self) -> Duration {
        self.body_idle_timeout
    }

    /// Sends a permitted request (its headers normalised by [`normalize_request_headers`], as the pipeline does
    /// before the checks) to its target and waits for the response headers, at most `response_timeout`
    /// (retry included). Dropping the returned future (the consumer went away) cancels the upstream exchange.
    ///
    /// The retry rule (RFC 9110 section 9.2.2): a request with an idempotent method and no body that fails on a
    /// reused pooled connection before its response head (the provider's keep-alive close raced it) is sent once
    /// more, on a new connection, and the exchange records `retried`. A request with a body, or with a method
    /// that is not idempotent, is never retried.
    pub async fn send(
        &self,
        permit: &Permit,
        request: Request<Incoming>,
        client_addr: SocketAddr,
        exchange: &Arc<Exchange>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let (mut parts, body) = request.into_parts();
        parts.uri = permit.target().uri().clone();
        // The pool speaks HTTP/1.1 only; an h2 consumer's request must be re-versioned or hyper refuses it.
        parts.version = Version::HTTP_11;
        rewrite_request_headers(&mut parts.headers, permit.target().authority(), client_addr);
        // Kept for a retry only when one is allowed; the header values share the request's buffers.
        let again = (parts.method.is_idempotent() && body.is_end_stream()).then(|| {
            let mut again = Request::new(Empty::new());
            *again.method_mut() = parts.method.clone();
            *again.uri_mut() = parts.uri.clone();
            *again.version_mut() = Version::HTTP_11;
            *again.headers_mut() = parts.headers.clone();
            again
        });
        let body = Streamed::new(
            body,
            self.body_idle_timeout,
            Arc::clone(exchange),
            Direction::Request,
        );
        let request = Request::from_parts(parts, body);
        let deadline = Instant::now() + self.response_timeout;
        let mut result = tokio::time::timeout_at(deadline, self.client.request(request)).await;
        if let (Ok(Err(e)), Some(again)) = (&result, again) {
            if on_stale_connection(e) {
                tracing::info!(
                    target_host = permit.target().authority(),
                    error = %e,
                    "stale pooled provider connection: closed before the response head; retrying once on a new connection"
                );
                exchange.retried();
                result = tokio::time::timeout_at(deadline, self.fresh.request(again)).await;
            }
        }
        match result {
            Ok(Ok(mut response)) => {
                if let Some(responses) = response.extensions().get::<Responses>() {
                    responses.0.fetch_add(1, Ordering::Relaxed);
                }
                strip_hop_by_hop(response.headers_mut());
                Ok(response)
            }
            // The consumer's body went quiet: a timeout, as the exchange records it, not an unreachable provider.
            Ok(Err(e)) if is_idle_timeout(&e) => Err(ForwardError::Timeout),
            Ok(Err(e)) => Err(ForwardError::Unreachable(Box::new(e))),
            Err(_) => Err(ForwardError::Timeout),
        }
    }
}

/// True when `e` is a request that failed on a connection that had already delivered a response, because the
/// connection closed or reset before this response's head: not a connect failure, not a timeout.
fn on_stale_connection(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let reused = e.connect_info().is_some_and(|info| {
        let mut extras = http::Extensions::new();
        info.get_extras(&mut extras);
        extras
            .get::<Responses>()
            .is_some_and(|r| r.0.load(Ordering::Relaxed) > 0)
    });
    if !reused {
        return false;
    }
    let mut next = std::error::Error::source(e);
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
        next = source.source();
    }
    false
}

/// True when [`IdleTimeout`] is somewhere in the error's source chain.
fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<IdleTimeout>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
}

/// Makes a consumer's request header fields what the provider's HTTP/1.1 leg will carry, before any check reads
/// them: hop-by-hop fields removed, including every field a `Connection` field names (any case, any position, any
/// number of `Connection` fields; RFC 9110 7.6.1), and an HTTP/2 consumer's split `cookie` fields joined into one
/// with `"; "` (RFC 9113 8.2.3).
pub fn normalize_request_headers(headers: &mut HeaderMap, version: Version) {
    strip_hop_by_hop(headers);
    if version == Version::HTTP_2 {
        join_cookies(headers);
    }
}

/// Joins several `cookie` fields into one, in order, with `"; "`.
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Applies the rest of DESIGN.md 1.5 to headers already normalised by [`normalize_request_headers`] (which the
/// pipeline does before the checks, so hop-by-hop fields are not looked for twice): `Host` set to the target
/// authority, `Forwarded` and `X-Forwarded-For` appended; every other header (the `Ssp-*` ones, `Authorization`)
/// unchanged. Every request passes here: the two values are written into one reused buffer.
pub fn rewrite_request_headers(headers: &mut HeaderMap, authority: &str, client_addr: SocketAddr) {
    use std::fmt::Write;
    if let Ok(host) = HeaderValue::from_str(authority) {
        headers.insert(header::HOST, host);
    }
    let ip = client_addr.ip().to_canonical();
    let mut value = String::with_capacity(64);
    // RFC 7239: an IPv6 node is bracketed and the value quoted.
    let _ = match ip {
        IpAddr::V4(v4) => write!(value, "for={v4};proto=https"),
        IpAddr::V6(v6) => write!(value, "for=\"[{v6}]\";proto=https"),
    };
    append_list(headers, header::FORWARDED, &mut value);
    value.clear();
    let _ = write!(value, "{ip}");
    append_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &mut value,
    );
}

/// Appends `value` to a comma-separated list header, joining existing lines into one (`value` is used as the
/// buffer).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &mut String) {
    let existing: Vec<&str> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !existing.is_empty() {
        let mine = std::mem::take(value);
        for line in existing {
            value.push_str(line);
            value.push_str(", ");
        }
        value.push_str(&mine);
    }
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Exchange accounting and the streaming body wrapper.

/// An exchange's outcome in its atomic cell: 0 while none is set (the consumer went away, if it stays so).
fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Ok => 1,
        Outcome::ClientClosed => 2,
        Outcome::UpstreamError => 3,
        Outcome::Timeout => 4,
        Outcome::Denied => 5,
    }
}

fn outcome_of(code: u8) -> Outcome {
    match code {
        1 => Outcome::Ok,
        3 => Outcome::UpstreamError,
        4 => Outcome::Timeout,
        5 => Outcome::Denied,
        _ => Outcome::ClientClosed,
    }
}

/// The running totals of one forwarded exchange, shared by the request and response body wrappers. When the last
/// holder lets go (both bodies ended or were dropped) the exchange is over and `on_end` runs, exactly once.
pub struct Exchange {
    started: Instant,
    /// Consumer to provider body bytes.
    bytes_in: AtomicU64,
    /// Provider to consumer body bytes.
    bytes_out: AtomicU64,
    status: AtomicU16,
    /// The first definite outcome wins; none at the end means the consumer went away.
    outcome: AtomicU8,
    /// Microseconds from the start to the provider's response head.
    upstream_us: AtomicU64,
    /// The request was sent a second time after a stale pooled connection.
    retried: std::sync::atomic::AtomicBool,
    /// Taken by `Drop`, which has `&mut self`, so no lock is needed to run it once.
    on_end: Option<EndHook>,
}

/// What runs when an exchange ends.
type EndHook = Box<dyn FnOnce(&ExchangeSummary) + Send + Sync>;

/// What is known when an exchange ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeSummary {
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// From the start of the request to the provider's response head.
    pub upstream: Duration,
    /// From the start of the request to the end of the exchange.
    pub total: Duration,
    /// `client_closed` while no outcome is set.
    pub outcome: Outcome,
    /// Sent a second time on a new connection after a stale pooled one (the retry rule of [`Upstream::send`]).
    pub retried: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("summary", &self.summary())
            .finish_non_exhaustive()
    }
}

impl Exchange {
    pub fn new(
        started: Instant,
        on_end: impl FnOnce(&ExchangeSummary) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            started,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            status: AtomicU16::new(0),
            outcome: AtomicU8::new(0),
            upstream_us: AtomicU64::new(0),
            retried: std::sync::atomic::AtomicBool::new(false),
            on_end: Some(Box::new(on_end)),
        })
    }

    /// Records the response status and the time to response headers.
    pub fn responded(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
        self.upstream_us
            .store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Records that the request went out a second time (see [`Upstream::send`]).
    pub fn retried(&self) {
        self.retried.store(true, Ordering::Relaxed);
    }

    /// Sets the outcome unless one is already set.
    pub fn finish(&self, outcome: Outcome) {
        let _ = self.outcome.compare_exchange(
            0,
            outcome_code(outcome),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub fn summary(&self) -> ExchangeSummary {
        ExchangeSummary {
            status: self.status.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            upstream: Duration::from_micros(self.upstream_us.load(Ordering::Relaxed)),
            total: self.started.elapsed(),
            outcome: outcome_of(self.outcome.load(Ordering::Acquire)),
            retried: self.retried.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let summary = self.summary();
        if let Some(hook) = self.on_end.take() {
            hook(&summary);
        }
    }
}

/// Which way a body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Consumer to provider.
    Request,
    /// Provider to consumer.
    Response,
}

/// A body that went quiet for longer than `upstream.body_idle_timeout`.
#[derive(Debug)]
pub struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("body idle timeout")
    }
}

impl std::error::Error for IdleTimeout {}

pin_project_lite::pin_project! {
    /// Passes frames through untouched, counting data bytes into the [`Exchange`] and failing the stream when no
    /// frame arrives for the idle timeout. Never buffers.
    pub struct Streamed<B> {
        #[pin]
        inner: B,
        // Armed at most once per idle period: frames only move `last_frame`, and the timer re-arms itself from
        // it when it fires, so a busy stream costs no timer updates. Boxed so that the body stays `Unpin`, which
        // hyper's pooled client requires of request bodies.
        idle: Pin<Box<Sleep>>,
        idle_timeout: Duration,
        last_frame: Instant,
        exchange: Arc<Exchange>,
        direction: Direction,
        done: bool,
    }
}

impl<B> std::fmt::Debug for Streamed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("direction", &self.direction)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B: Body> Streamed<B> {
    pub fn new(
        inner: B,
        idle_timeout: Duration,
        exchange: Arc<Exchange>,
        direction: Direction,
    ) -> Self {
        let now = Instant::now();
        // An empty body (204, `Content-Length: 0`) is never polled: it is complete as it stands.
        if direction == Direction::Response && inner.is_end_stream() {
            exchange.finish(Outcome::Ok);
        }
        Self {
            inner,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            idle_timeout,
            last_frame: now,
            exchange,
            direction,
            done: false,
        }
    }
}

impl<B> Body for Streamed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let counter = match this.direction {
                        Direction::Request => &this.exchange.bytes_in,
                        Direction::Response => &this.exchange.bytes_out,
                    };
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                *this.last_frame = Instant::now();
                // hyper stops polling once a sized body reports its end, so the final `None` may never come:
                // the last frame is where a complete response is known to be complete.
                if *this.direction == Direction::Response && this.inner.is_end_stream() {
                    this.exchange.finish(Outcome::Ok);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                *this.done = true;
                this.exchange.finish(match this.direction {
                    Direction::Request => Outcome::ClientClosed,
                    Direction::Response => Outcome::UpstreamError,
                });
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                *this.done = true;
                if *this.direction == Direction::Response {
                    this.exchange.finish(Outcome::Ok);
                }
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                ready!(this.idle.as_mut().poll(cx));
                let deadline = *this.last_frame + *this.idle_timeout;
                if deadline > Instant::now() {
                    this.idle.as_mut().reset(deadline);
                    continue;
                }
                *this.done = true;
                this.exchange.finish(Outcome::Timeout);
                return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_follow_the_forwarding_rules() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("ssp.example:8443"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc."),
        );
        h.insert(
            "ssp-traceid",
            HeaderValue::from_static("629ea9ba-a077-4d99-b289-7a9b19fd4e03"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        normalize_request_headers(&mut h, Version::HTTP_11);
        rewrite_request_headers(
            &mut h,
            "provider.example:9443",
            "127.0.0.9:5555".parse().unwrap(),
        );
        assert_eq!(h[header::HOST], "provider.example:9443");
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "transfer-encoding",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h[header::AUTHORIZATION], "Bearer abc.");
        assert_eq!(h["ssp-traceid"], "629ea9ba-a077-4d99-b289-7a9b19fd4e03");
        assert_eq!(h[header::FORWARDED], "for=127.0.0.9;proto=https");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
    }

    #[test]
    fn normalising_removes_what_connection_names_before_the_checks() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Ssp-TraceID, ssp-from"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" keep-alive ,AUTHORIZATION"),
        );
        h.insert("ssp-traceid", HeaderValue::from_static("x"));
        h.insert("ssp-from", HeaderValue::from_static("1"));
        h.insert("ssp-to", HeaderValue::from_static("2"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        normalize_request_headers(&mut h, Version::HTTP_11);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["ssp-to"]);
    }

    #[test]
    fn http2_cookies_are_joined_in_order() {
        let mut h = HeaderMap::new();
        for c in ["a=1", "b=2", "c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        let mut h1 = h.clone();
        normalize_request_headers(&mut h, Version::HTTP_2);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2; c=3");
        normalize_request_headers(&mut h1, Version::HTTP_11);
        assert_eq!(h1.get_all(header::COOKIE).iter().count(), 3);
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        rewrite_request_headers(&mut h, "p:1", "[::1]:5555".parse().unwrap());
        assert_eq!(h[header::FORWARDED], "for=\"[::1]\";proto=https");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[tokio::test]
    async fn exchange_hook_fires_once_with_the_first_outcome() {
        let (tx, rx) = std::sync::mpsc::channel();
        let exchange = Exchange::new(Instant::now(), move |s| tx.send(*s).unwrap());
        exchange.responded(200);
        exchange.finish(Outcome::Timeout);
        exchange.finish(Outcome::Ok);
        let other = Arc::clone(&exchange);
        drop(exchange);
        assert!(rx.try_recv().is_err(), "fired while still held");
        drop(other);
        let s = rx.try_recv().unwrap();
        assert_eq!((s.status, s.outcome), (200, Outcome::Timeout));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out_and_a_busy_one_does_not() {
        use http_body_util::{BodyExt, StreamBody};
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = tokio_stream_from(rx);
        let exchange = Exchange::new(Instant::now(), |_| {});
        let mut body = Streamed::new(
            StreamBody::new(stream),
            Duration::from_secs(10),
            exchange.clone(),
            Direction::Response,
        );
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(6)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
                .await
                .unwrap();
            assert_eq!(
                body.frame().await.unwrap().unwrap().into_data().unwrap(),
                "abc"
            );
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimeout>());
        assert_eq!(exchange.summary().bytes_out, 15);
        assert_eq!(exchange.summary().outcome, Outcome::Timeout);
    }

    /// A minimal `Stream` over an mpsc receiver (tokio-stream is not a dependency).
    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_core_stream::Stream<Item = T> {
        futures_core_stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    mod futures_core_stream {
        pub use futures_core::Stream;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        pub struct PollFn<F>(F);
        impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> Stream for PollFn<F> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                (self.0)(cx)
            }
        }
        pub fn poll_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin>(
            f: F,
        ) -> PollFn<F> {
            PollFn(f)
        }
    }
}
