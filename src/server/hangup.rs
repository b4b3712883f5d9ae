//! Noticing a consumer that closes its HTTP/1.1 connection while one of its requests waits for its audit record or
//! for the provider.
//!
//! hyper's HTTP/1.1 server runs with `half_close(true)`: it does not read the socket while a request is being
//! handled. (Without it hyper reads ahead on every request to see whether the consumer has gone, and may take a new
//! 8 KiB read buffer while the bytes of the request just parsed still share the old one; what turning it off measured
//! is in `benches/RESULTS.md`.) Instead, each HTTP/1.1 connection's socket is also registered with the worker's event loop through a
//! duplicate descriptor, read by no one: the kernel marks it read-closed (`EPOLLRDHUP`, `EPOLLHUP`) when the consumer
//! sends its FIN or a reset, whatever unread bytes precede it, and a request's handling stops at that point as it did
//! when hyper read the end of the stream itself: its future is dropped and its exchange ends `client_closed`. The
//! watch costs a descriptor and one `epoll_ctl` per connection, and no system call per request. HTTP/2 needs none:
//! hyper reads an HTTP/2 connection throughout.
//!
//! What it does not see: a consumer that sends TLS close_notify and keeps its TCP connection open. The alert is bytes
//! to read, not a closed socket, and under TLS 1.3 it cannot be told from a pipelined request without decrypting it;
//! such a request is handled to its end (answered, or `upstream.response_timeout`), as TLS 1.3's half-close allows
//! (RFC 8446 section 6.1); hyper's read-ahead, off here, would drop it as `client_closed`. A FIN after the alert is
//! seen at once. A consumer that shuts down its write side after a whole request (`shutdown(SHUT_WR)`)
//! is taken as gone, as hyper took it: its request is dropped, `client_closed`.

use std::os::fd::AsFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// A connection's socket, watched for the consumer's close: a second `TcpStream` on a duplicate of its descriptor,
/// never read or written (the duplicate shares the socket; closing it closes only the duplicate).
#[derive(Debug)]
pub(super) struct Hangup(TcpStream);

impl Hangup {
    /// Watches `tcp` on this thread's event loop; `None` when the descriptor cannot be duplicated or registered
    /// (out of descriptors): the connection is served all the same, and a consumer that goes away mid-request is
    /// then noticed only when its response is written.
    pub(super) fn watch(tcp: &TcpStream) -> Option<Self> {
        let fd = tcp.as_fd().try_clone_to_owned().ok()?;
        // Non-blocking already: the duplicate shares the socket's file status flags.
        TcpStream::from_std(std::net::TcpStream::from(fd))
            .ok()
            .map(Self)
    }

    /// Resolves once the consumer has closed its side of the connection or reset it. Bytes that arrive before that
    /// (the next request, pipelined) are left for hyper.
    pub(super) async fn closed(&self) {
        loop {
            let Ok(ready) = self.0.ready(Interest::READABLE).await else {
                // The registration failed: never resolve, as with no watch.
                return std::future::pending().await;
            };
            if ready.is_read_closed() {
                return;
            }
            // Readable only (bytes for hyper): forget this readiness and wait for the next event, without reading.
            let _ = self.0.try_io(Interest::READABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
        }
    }
}

/// The error a request's handling ends with when its consumer has gone: hyper then closes the connection.
#[derive(Debug)]
pub(super) struct ConsumerGone;

impl std::fmt::Display for ConsumerGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the consumer closed its connection while its request was handled")
    }
}

impl std::error::Error for ConsumerGone {}
