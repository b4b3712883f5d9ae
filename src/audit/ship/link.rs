//! The connection to the collector: TCP, or TLS with this instance's client certificate (RFC 5425), blocking (the
//! shipper has a thread of its own), and the confirmation of a batch by closing it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConnection, StreamOwned};

use crate::config::{ShipConfig, ShipTransport};
use crate::tls::{load_certs, load_key, load_roots, provider};

/// Bound on each step (connecting, a write, the close): a collector that stops reading fails the batch.
pub(super) const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to connect, and how.
pub(super) struct Target {
    pub(super) collector: String,
    pub(super) tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
}

/// The TLS client config toward the collector, and the name its certificate must carry.
pub(super) type ClientTls = (
    Arc<rustls::ClientConfig>,
    rustls_pki_types::ServerName<'static>,
);

/// The TLS client config of `[audit.ship]` (none for `tcp`): TLS 1.2 or 1.3, the collector checked against
/// `audit.ship.ca` and `server_name`, this instance's certificate offered. Every problem, each naming its key.
pub(super) fn tls_config(cfg: &ShipConfig) -> Result<Option<ClientTls>, Vec<String>> {
    let ShipTransport::Tls {
        ca,
        cert,
        key,
        server_name,
    } = &cfg.transport
    else {
        return Ok(None);
    };
    let loaded = (
        load_certs("audit.ship.cert", cert),
        load_key("audit.ship.key", key),
        load_roots("audit.ship.ca", ca),
        rustls_pki_types::ServerName::try_from(server_name.clone())
            .map_err(|e| format!("audit.ship.server_name: {e}")),
    );
    let (chain, key, roots, name) = match loaded {
        (Ok(chain), Ok(key), Ok(roots), Ok(name)) => (chain, key, roots, name),
        (chain, key, roots, name) => {
            return Err([chain.err(), key.err(), roots.err(), name.err()]
                .into_iter()
                .flatten()
                .collect());
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![format!("audit.ship: {e}")])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| vec![format!("audit.ship.cert / audit.ship.key: {e}")])?;
    Ok(Some((Arc::new(config), name)))
}

/// An open connection, and the instant by which everything on it must be done.
pub(super) struct Conn {
    stream: Stream,
    deadline: Instant,
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

/// The error of a step that ran out of time, saying so (a blocking call's timeout reads as "Resource temporarily
/// unavailable" otherwise).
fn late(e: io::Error, what: &str) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the collector did not {what} in time"),
        )
    } else {
        e
    }
}

impl Target {
    /// Connects (each address the name resolves to in turn) and, with TLS, completes the handshake; every step
    /// of this connection, the confirmation included, must be over by `deadline`.
    pub(super) fn connect(
        &self,
        deadline: Instant,
        socket: &std::sync::Mutex<Option<TcpStream>>,
    ) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        for addr in self.collector.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
                Ok(sock) => {
                    sock.set_nodelay(true)?;
                    *socket.lock().unwrap_or_else(|p| p.into_inner()) = sock.try_clone().ok();
                    let stream = match &self.tls {
                        None => Stream::Tcp(sock),
                        Some((config, name)) => {
                            let tls = ClientConnection::new(Arc::clone(config), name.clone())
                                .map_err(io::Error::other)?;
                            let mut stream = StreamOwned::new(tls, sock);
                            while stream.conn.is_handshaking() {
                                bound(&stream.sock, deadline)?;
                                stream
                                    .conn
                                    .complete_io(&mut stream.sock)
                                    .map_err(|e| late(e, "complete the TLS handshake"))?;
                            }
                            Stream::Tls(Box::new(stream))
                        }
                    };
                    return Ok(Conn { stream, deadline });
                }
                Err(e) => last = late(e, "accept the connection"),
            }
        }
        Err(last)
    }
}

/// The time left until `deadline`, or a timeout error when there is none.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "out of time for this batch"))
}

/// Sets the socket's read and write timeouts to what is left until `deadline` (at most [`IO_TIMEOUT`]).
fn bound(sock: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = remaining(deadline)?.min(IO_TIMEOUT);
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

impl Conn {
    fn sock(&self) -> &TcpStream {
        match &self.stream {
            Stream::Tcp(sock) => sock,
            Stream::Tls(stream) => &stream.sock,
        }
    }

    /// Brings the deadline forward to `stop`, when a stop was asked for.
    pub(super) fn cap(&mut self, stop: Option<Instant>) {
        if let Some(stop) = stop {
            self.deadline = self.deadline.min(stop);
        }
    }

    pub(super) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        bound(self.sock(), self.deadline)?;
        match &mut self.stream {
            Stream::Tcp(sock) => sock.write_all(bytes),
            Stream::Tls(stream) => stream.write_all(bytes).and_then(|()| stream.flush()),
        }
        .map_err(|e| late(e, "take the records"))
    }

    /// Confirms that the collector read everything sent: it must not have closed or sent anything first (a probe
    /// before our close; syslog over TLS is one way), then our close (TLS close_notify and a FIN) must be answered
    /// by its close, with no error on the socket, before the deadline. A collector that closes with bytes unread
    /// resets the connection instead, which fails here; so does one that sends data.
    pub(super) fn confirm(mut self) -> io::Result<()> {
        let spoke = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the collector sent data on a one-way connection",
            )
        };
        // The probe: nothing should be readable yet.
        self.sock().set_nonblocking(true)?;
        let mut buf = [0u8; 512];
        match self.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the collector closed the connection before the batch was confirmed",
                ));
            }
            Ok(_) => return Err(spoke()),
            Err(e) => return Err(e),
        }
        self.sock().set_nonblocking(false)?;
        bound(self.sock(), self.deadline)?;
        if let Stream::Tls(stream) = &mut self.stream {
            stream.conn.send_close_notify();
            while stream.conn.wants_write() {
                stream
                    .conn
                    .write_tls(&mut stream.sock)
                    .map_err(|e| late(e, "take the close"))?;
            }
        }
        self.sock().shutdown(Shutdown::Write)?;
        bound(self.sock(), self.deadline)?;
        match self.read(&mut buf) {
            Ok(0) => {}
            // The collector closed TCP without a close_notify: still its close.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Ok(_) => return Err(spoke()),
            Err(e) => return Err(late(e, "close its end")),
        }
        match self.sock().take_error()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(sock) => sock.read(buf),
            Stream::Tls(stream) => stream.read(buf),
        }
    }
}
