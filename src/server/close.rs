//! The staged close of a connection ssp ends (RFC 9112 section 9.6): the answer or alert already written reaches
//! the client before the socket closes.

use std::io;
use std::time::Duration;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::ConnGuard;
use crate::proxy::{ConnControl, Cut};

// The staged close (RFC 9112 section 9.6).

/// Longest a closing connection keeps reading and discarding what the client still sends (nginx's
/// `lingering_time` is the same): a refused upload on a slow link still gets its answer.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest a closing connection waits for the client's next bytes (nginx's `lingering_timeout`).
pub(crate) const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Most bytes a closing connection reads and discards.
pub(crate) const LINGER_BYTES: u64 = 256 * 1024 * 1024;
/// How long an idle connection asked to close may take to finish (an HTTP/2 client answering the GOAWAY's PING)
/// before it is dropped.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Closes a connection ssp is ending in stages, so that the answer (or TLS alert) already written reaches the
/// client: shut down the write side, read and discard what the client still sends for at most [`LINGER_TIME`]
/// and [`LINGER_BYTES`] (and [`LINGER_IDLE`] between reads), then close. Closing at once with unread bytes in the receive buffer would make the kernel
/// send a reset, which can destroy the answer in flight. The connection's guard is held until the end.
pub(super) async fn close_in_stages(mut tcp: TcpStream, guard: ConnGuard, deadline: Instant) {
    // A second shutdown of the write side (after TLS's own) is harmless; the first waits for nothing.
    let _ = tokio::time::timeout(LINGER_IDLE, tcp.shutdown()).await;
    drain_until(&mut tcp, deadline).await;
    drop(tcp);
    drop(guard);
}

/// As [`close_in_stages`] for a TLS connection whose close_notify may not have been sent: send it (bounded by the
/// same deadline), then go on at the TCP level, where the client's remaining records are discarded unread.
pub(super) async fn close_tls_in_stages(mut tls: TlsStream<TcpStream>, guard: ConnGuard) {
    let deadline = Instant::now() + LINGER_TIME;
    // A client that reads nothing cannot hold the close_notify's flush for longer than the idle bound.
    let _ = tokio::time::timeout(LINGER_IDLE, tls.shutdown()).await;
    let (tcp, _) = tls.into_inner();
    close_in_stages(tcp, guard, deadline).await;
}

/// Reads and discards until end of stream, an error, `deadline` or [`LINGER_BYTES`].
pub(super) async fn drain_until<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) {
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
pub(super) struct ConsumerIo {
    tls: Option<TlsStream<TcpStream>>,
    /// A read returned end of stream: the client has closed its side, nothing more can arrive.
    peer_closed: bool,
    /// hyper shut the write side down (close_notify sent, TCP FIN).
    write_closed: bool,
    guard: Option<ConnGuard>,
    /// Says whether the connection was cut ([`Cut::Abort`]): then it closes without close_notify.
    control: Arc<ConnControl>,
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
    pub(super) fn new(
        tls: TlsStream<TcpStream>,
        guard: ConnGuard,
        control: Arc<ConnControl>,
    ) -> Self {
        Self {
            tls: Some(tls),
            peer_closed: false,
            write_closed: false,
            guard: Some(guard),
            control,
        }
    }

    pub(super) fn stream(&mut self) -> io::Result<Pin<&mut TlsStream<TcpStream>>> {
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
        let cut = self.control.asked() == Some(Cut::Abort);
        // Outside a runtime (the process is ending) there is no one left to answer.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.write_closed || cut {
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
