//! Dialling a provider: static resolution first, then DNS; TCP; TLS with the proxy's client certificate.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to a provider.
pub(crate) type ProviderStream = TlsStream<TcpStream>;

/// Opens TLS connections to providers.
#[derive(Clone)]
pub(crate) struct Connector {
    /// Read once per new provider connection, so a reload applies to new connections and the pool carries on.
    pub(super) tls: Arc<crate::tls::Reloadable>,
    /// `host:port` (lower case) to the address to dial instead of resolving.
    pub(super) resolve: Arc<HashMap<String, SocketAddr>>,
    pub(super) connect_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("resolve", &self.resolve)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a provider connection could not be opened.
#[derive(Debug)]
pub(crate) struct ConnectError(pub(super) String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl Connector {
    /// Dials `host:port` (`host` as in a URI: an IPv6 literal bracketed; `key` its lower-case `host:port`): every
    /// address it resolves to in turn, until one completes TCP and the TLS handshake. Not bounded in time here:
    /// the caller bounds it by `upstream.connect_timeout`, together with the wait for a connection slot.
    pub(super) async fn dial(
        &self,
        host: &str,
        port: u16,
        key: &str,
    ) -> Result<ProviderStream, super::BoxError> {
        // IPv6 literals come bracketed from `Uri::host`.
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = match bare_host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(bare_host.to_owned())
                .map_err(|e| ConnectError(format!("bad server name: {e}")))?,
        };
        let addrs: Vec<SocketAddr> = match self.resolve.get(key) {
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
                    return Ok(tls);
                }
                Err(e) => last = e,
            }
        }
        Err(Box::new(last))
    }
}
