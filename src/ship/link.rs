//! The connection to the collector: TCP, or TLS with this instance's client certificate (RFC 5425), blocking (the
//! shipper has a thread of its own), and the confirmation of a batch by closing it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};

use crate::config::{ShipConfig, ShipTransport};
use crate::tls::{load_certs, load_key, load_roots, provider};

/// Bound on connecting, and on each read and write: a collector that stops reading fails the batch.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to connect, and how.
pub(super) struct Target {
    pub(super) collector: String,
    pub(super) tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// The TLS client config of `[audit.ship]` (none for `tcp`): TLS 1.2 or 1.3, the collector checked against
/// `audit.ship.ca` and `server_name`, this instance's certificate offered. Each problem names its key.
#[allow(clippy::type_complexity)]
pub(super) fn tls_config(
    cfg: &ShipConfig,
) -> Result<
    Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    Vec<String>,
> {
    let ShipTransport::Tls {
        ca,
        cert,
        key,
        server_name,
    } = &cfg.transport
    else {
        return Ok(None);
    };
    let chain = load_certs("audit.ship.cert", cert);
    let key = load_key("audit.ship.key", key);
    let roots = load_roots("audit.ship.ca", ca);
    let name = rustls_pki_types::ServerName::try_from(server_name.clone())
        .map_err(|e| format!("audit.ship.server_name: {e}"));
    let (Ok(chain), Ok(key), Ok(roots), Ok(name)) = (chain, key, roots, name) else {
        return Err(collect_problems(cfg));
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![format!("audit.ship: {e}")])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| vec![format!("audit.ship.cert / audit.ship.key: {e}")])?;
    Ok(Some((Arc::new(config), name)))
}

/// Every problem of the TLS files, each naming its key.
fn collect_problems(cfg: &ShipConfig) -> Vec<String> {
    let ShipTransport::Tls {
        ca,
        cert,
        key,
        server_name,
    } = &cfg.transport
    else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    problems.extend(load_certs("audit.ship.cert", cert).err());
    problems.extend(load_key("audit.ship.key", key).err());
    problems.extend(load_roots("audit.ship.ca", ca).err());
    problems.extend(
        rustls_pki_types::ServerName::try_from(server_name.clone())
            .err()
            .map(|e| format!("audit.ship.server_name: {e}")),
    );
    problems
}

/// An open connection.
pub(super) enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Target {
    /// Connects (each address the name resolves to in turn) and, with TLS, completes the handshake.
    pub(super) fn connect(&self) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        for addr in self.collector.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
                Ok(sock) => {
                    sock.set_read_timeout(Some(IO_TIMEOUT))?;
                    sock.set_write_timeout(Some(IO_TIMEOUT))?;
                    sock.set_nodelay(true)?;
                    let Some((config, name)) = &self.tls else {
                        return Ok(Conn::Tcp(sock));
                    };
                    let tls = ClientConnection::new(Arc::clone(config), name.clone())
                        .map_err(io::Error::other)?;
                    let mut stream = StreamOwned::new(tls, sock);
                    while stream.conn.is_handshaking() {
                        stream.conn.complete_io(&mut stream.sock)?;
                    }
                    return Ok(Conn::Tls(Box::new(stream)));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl Conn {
    fn sock(&self) -> &TcpStream {
        match self {
            Conn::Tcp(sock) => sock,
            Conn::Tls(stream) => &stream.sock,
        }
    }

    pub(super) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(sock) => sock.write_all(bytes),
            Conn::Tls(stream) => {
                stream.write_all(bytes)?;
                stream.flush()
            }
        }
    }

    /// Confirms that the collector read everything sent: it must not have closed first (a probe before ours),
    /// then our close (TLS close_notify and a FIN) must be answered by its close, with no error on the socket.
    /// A collector that closes with bytes unread resets the connection instead, which fails here.
    pub(super) fn confirm(mut self) -> io::Result<()> {
        let closed_first = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the collector closed the connection before the batch was confirmed",
            )
        };
        // The probe: nothing should be readable yet.
        self.sock().set_nonblocking(true)?;
        let mut byte = [0u8; 512];
        match self.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(_) => return Err(closed_first()),
            Err(e) => return Err(e),
        }
        self.sock().set_nonblocking(false)?;
        if let Conn::Tls(stream) = &mut self {
            stream.conn.send_close_notify();
            while stream.conn.wants_write() {
                stream.conn.write_tls(&mut stream.sock)?;
            }
        }
        self.sock().shutdown(Shutdown::Write)?;
        loop {
            match self.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => continue,
                // The collector closed TCP without a close_notify: still its close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        match self.sock().take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(sock) => sock.read(buf),
            Conn::Tls(stream) => stream.read(buf),
        }
    }
}
