//! The pooled upstream client, its timeouts, and the retry of a request that met a stale pooled connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::Body;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::connector::Responses;
use super::{
    Connector, Direction, Exchange, ForwardError, IdleTimeout, Streamed, rewrite_request_headers,
    strip_hop_by_hop,
};
use crate::config::UpstreamConfig;
use crate::policy::Permit;

/// The request body sent upstream: the consumer's body, streamed.
pub(crate) type UpstreamBody = Streamed<Incoming>;

/// The pooled upstream client and its timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: Client<Connector, UpstreamBody>,
    /// Never pools: the one retry of a request that failed on a stale pooled connection goes out on a new one.
    fresh: Client<Connector, Empty<Bytes>>,
    response_timeout: Duration,
    body_idle_timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(
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

    pub(crate) fn body_idle_timeout(&self) -> Duration {
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
    pub(crate) async fn send(
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
