//! One accepted connection on its way to being served, and how it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::proxy_protocol::{self, ProxyHeader, ProxyHeaderError};
use crate::metrics::Metrics;
use crate::proxy::{ConnControl, ConnInfo, Cut, Door, Proxy};
use crate::tls;

use super::close::{CLOSE_GRACE, ConsumerIo, LINGER_TIME, close_in_stages};
use super::hangup::{ConsumerGone, Hangup};
use super::idle_rule::{Activity, IdleTimeouts, Tracked};
use super::{ConnGuard, Stop};

/// The whole answer to plain HTTP on the TLS port.
const PLAINTEXT_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 78\r\nConnection: close\r\n\r\nThis port speaks HTTPS with TLS mutual authentication; plain HTTP is refused.\n";

/// One accepted TCP connection on its way to being served.
pub(super) struct Connection {
    pub(super) id: u64,
    pub(super) acceptor: TlsAcceptor,
    pub(super) proxy: Arc<Proxy>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) http: auto::Builder<TokioExecutor>,
    pub(super) handshake_timeout: Duration,
    pub(super) idle: IdleTimeouts,
    pub(super) proxy_protocol_from: Arc<[ipnet::IpNet]>,
    /// Which listener accepted it.
    pub(super) door: Door,
}

impl Connection {
    pub(super) async fn serve(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
        guard: ConnGuard,
        mut stop: watch::Receiver<Stop>,
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
            match tokio::time::timeout_at(deadline, proxy_protocol::read(&mut tcp)).await {
                Ok(Ok(ProxyHeader::Relayed(consumer))) => (consumer, Some(remote)),
                Ok(Ok(ProxyHeader::Local)) => (remote, None),
                Ok(Err(ProxyHeaderError::Closed)) => return,
                Ok(Err(e)) => {
                    self.metrics.tls_failure(e.reason());
                    tracing::info!(conn = self.id, %remote, error = %e, "PROXY protocol header refused; closing");
                    close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                    return;
                }
                Err(_) => {
                    self.metrics.tls_failure("timeout");
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
            Ok(Ok(n @ 1..)) if proxy_protocol::looks_like_proxy_header(&first[..n]) => {
                self.metrics.tls_failure("proxy_header_untrusted");
                tracing::warn!(
                    conn = self.id,
                    %remote,
                    "PROXY protocol header from a source not in server.proxy_protocol_from; closing"
                );
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            Ok(Ok(1..)) if first[0].is_ascii_uppercase() => {
                self.metrics.tls_failure("plaintext_http");
                tracing::info!(conn = self.id, %remote, "plain HTTP on the TLS port; answered 400");
                let _ = tokio::time::timeout_at(deadline, tcp.write_all(PLAINTEXT_ANSWER)).await;
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            // Closed before sending a byte: a TCP health check or a port probe, not a failed handshake.
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                self.metrics.tls_failure("timeout");
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
                self.metrics.tls_failure(crate::tls::failure_reason(&e));
                tracing::info!(conn = self.id, %remote, error = %e, "TLS handshake refused");
                close_in_stages(tcp, guard, Instant::now() + LINGER_TIME).await;
                return;
            }
            Err(_) => {
                self.metrics.tls_failure("timeout");
                tracing::info!(conn = self.id, %remote, "TLS handshake timed out");
                return;
            }
        };
        let session = tls.get_ref().1;
        let peer = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(tls::peer_identity);
        let http2 = session.alpn_protocol() == Some(b"h2");
        let idle_timeout = if http2 {
            self.idle.http2
        } else {
            self.idle.http1
        };
        let certified = session.peer_certificates().is_some_and(|c| !c.is_empty());
        let (peer, audit_peer) = match peer {
            Some(peer) => {
                let audit_peer = crate::audit::Peer::new(remote, via, &peer);
                (peer, audit_peer)
            }
            // A patient-facing listener without `client_ca` asks for no certificate: its apps are named by their
            // tokens.
            None if !certified && self.door == Door::PatientFacing => (
                crate::ids::PeerIdentity::default(),
                crate::audit::Peer::anonymous(remote, via),
            ),
            None => {
                tracing::warn!(conn = self.id, %remote, "verified client certificate could not be read; closing");
                return;
            }
        };
        tracing::debug!(conn = self.id, %remote, ?via, subject = %peer.subject, door = ?self.door, "connection accepted");
        let audit_peer = Arc::new(audit_peer);
        let control = Arc::new(ConnControl::default());
        let info = Arc::new(ConnInfo {
            id: self.id,
            peer,
            audit_peer,
            client: crate::forward::ClientFields::of(remote),
            control: Arc::clone(&control),
            noted: std::sync::OnceLock::new(),
            door: self.door,
            certified,
        });
        let activity = Arc::new(Activity::new());
        let proxy = self.proxy;
        // HTTP/1.1: hyper does not read while a request is handled (`half_close`); the socket is watched instead.
        let hangup = if http2 {
            None
        } else {
            Hangup::watch(tls.get_ref().0).map(Arc::new)
        };
        let service = {
            let activity = Arc::clone(&activity);
            service_fn(move |request| {
                let proxy = Arc::clone(&proxy);
                let info = Arc::clone(&info);
                let hangup = hangup.clone();
                // In flight from the complete request head until hyper has sent (or dropped) the response body.
                let busy = activity.busy();
                async move {
                    let handled = proxy.handle(request, &info);
                    let response = match &hangup {
                        None => handled.await,
                        // The consumer gone before the response head: the handling is dropped, as hyper dropped it
                        // when it read the end of the stream itself, and its exchange ends `client_closed`.
                        Some(hangup) => tokio::select! {
                            biased;
                            response = handled => response,
                            () = hangup.closed() => return Err(ConsumerGone),
                        },
                    };
                    let Ok(response) = response;
                    if crate::proxy::ConsumerLeft::marks(&response) {
                        return Err(ConsumerGone);
                    }
                    Ok(response.map(|body| Tracked { body, _busy: busy }))
                }
            })
        };
        let io = ConsumerIo::new(tls, guard, Arc::clone(&control));
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
        let mut cut_seen = None;
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break Some(result),
                cut = control.wait_beyond(cut_seen) => {
                    cut_seen = Some(cut);
                    match cut {
                        // `ConsumerIo` sees the cut when it is dropped below, and closes without close_notify.
                        Cut::Abort => break None,
                        Cut::GoAway => {
                            closing = true;
                            idle_closing = true;
                            hard_close.as_mut().reset(Instant::now() + CLOSE_GRACE);
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
                changed = stop.changed() => {
                    let asked = *stop.borrow_and_update();
                    match asked {
                        // The listener is gone, or the grace period is over: in-flight exchanges end here.
                        _ if changed.is_err() => break None,
                        Stop::Drop => break None,
                        Stop::Drain if !closing => {
                            closing = true;
                            connection.as_mut().graceful_shutdown();
                        }
                        Stop::Serve | Stop::Drain => {}
                    }
                }
                () = idle.as_mut(), if !closing => {
                    match activity.idle_until(idle_timeout) {
                        // HTTP/1.1 with no request in flight has nothing to finish: the connection is closed now,
                        // a request head still arriving with it (hyper's own header-read timer is off: this is
                        // what bounds a slow head).
                        Some(end) if end <= Instant::now() && !http2 => {
                            tracing::debug!(conn = self.id, idle_s = idle_timeout.as_secs_f64(), "idle connection closed");
                            break None;
                        }
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
            // A response body that failed (the provider's body broke or went idle) leaves a response the
            // consumer may not be able to tell from a complete one: a body delimited by the close, for one. The
            // connection then ends without close_notify, which tells the consumer it was cut (RFC 9112 section
            // 9.8); a clean close would say the body was complete.
            if response_body_failed(&*e) {
                control.cut(Cut::Abort);
            }
            tracing::debug!(conn = self.id, error = %e, "connection ended with an error");
        }
    }
}

/// Whether hyper ended an HTTP/1 connection because the response body it was sending failed (hyper's "user body"
/// error, whose source is the body's own error).
fn response_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
    })
}
