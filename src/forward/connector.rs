//! The connector: static resolution first, then DNS; TCP; TLS with the proxy's client certificate.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::BoxError;

/// Opens TLS connections to providers for the pooled client.
#[derive(Clone)]
pub(crate) struct Connector {
    /// Read once per new provider connection, so a reload applies to new connections and the pool carries on.
    pub(super) tls: Arc<crate::tls::Reloadable>,
    /// `host:port` (lower case) to the address to dial instead of resolving.
    pub(super) resolve: Arc<HashMap<String, SocketAddr>>,
    pub(super) connect_timeout: Duration,
    /// One semaphore per provider `host:port`, bounding the TLS connections held open to it (idle ones
    /// included). The hosts are those of permitted targets, so the map holds registered endpoints only.
    pub(super) slots: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>,
    pub(super) per_provider_connections: usize,
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
pub(crate) struct UpstreamIo {
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
pub(super) struct Responses(pub(super) Arc<AtomicU64>);

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
